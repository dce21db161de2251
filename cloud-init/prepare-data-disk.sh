#!/usr/bin/env bash
# Finds Chroma's data disk by LUN, waits for it to appear, and makes an ext4 filesystem on it
# only when the device is blank. It runs at every boot, so a replacement VM that attaches the
# same disk finds its filesystem and keeps the data.
#
# It never forces mkfs, and it decides "blank" by reading the device itself (blkid -p and the
# first MiB), not udev's database: cloud-init's lsblk-based check has erased a disk that udev
# had no record of.
set -euo pipefail

lun="${DATA_DISK_LUN:-0}"
label="${DATA_DISK_LABEL:-chroma-data}"
wait_seconds="${DATA_DISK_WAIT_SECONDS:-300}"
# azure-vm-utils' link covers SCSI and NVMe; WALinuxAgent's covers SCSI only.
read -r -a candidates <<<"${DATA_DISK_CANDIDATES:-/dev/disk/azure/data/by-lun/$lun /dev/disk/azure/scsi1/lun$lun}"

log() { printf 'chroma-data-disk: %s\n' "$*" >&2; }
fail() {
	log "ERROR: $*"
	exit 1
}

find_device() {
	local link
	for link in "${candidates[@]}"; do
		if [[ -e "$link" ]]; then
			readlink -f -- "$link"
			return 0
		fi
	done
	return 1
}

wait_for_device() {
	local deadline=$((SECONDS + wait_seconds))
	until find_device; do
		if ((SECONDS >= deadline)); then
			fail "no data disk appeared at LUN $lun within ${wait_seconds}s (looked for ${candidates[*]}). Attach the disk at LUN $lun; Chroma stays stopped until it is there."
		fi
		log "waiting for the data disk at LUN $lun ($((deadline - SECONDS))s left)"
		udevadm settle --timeout=5 2>/dev/null || true
		sleep 2
	done
}

# Prints blkid's KEY=value lines for whatever the device holds; nothing for a blank device.
probe() {
	local status=0
	blkid -p -o export -- "$1" || status=$?
	# 2 means blkid found no signature at all.
	if ((status != 0 && status != 2)); then
		fail "blkid could not read $1 (exit $status); not touching it."
	fi
}

first_mib_is_zero() {
	cmp --silent --bytes=1048576 -- "$1" /dev/zero
}

label_link_appears() {
	udevadm trigger --action=change -- "$1" 2>/dev/null || true
	udevadm settle --timeout=30 2>/dev/null || true
	[[ -e "/dev/disk/by-label/$label" ]]
}

device=$(wait_for_device)
[[ -b "$device" ]] || fail "$device (LUN $lun) is not a block device."
signature=$(probe "$device")
fs_type=$(sed -n 's/^TYPE=//p' <<<"$signature")
fs_label=$(sed -n 's/^LABEL=//p' <<<"$signature")
table_type=$(sed -n 's/^PTTYPE=//p' <<<"$signature")

if [[ "$fs_type" == ext4 && "$fs_label" == "$label" ]]; then
	log "$device already holds Chroma's filesystem (label $label); keeping its data."
elif [[ -n "$fs_type" || -n "$table_type" ]]; then
	fail "$device (LUN $lun) holds ${fs_type:-a $table_type partition table}${fs_label:+ labelled $fs_label}, not an ext4 filesystem labelled $label. Refusing to format it. If its data may go, wipe it (wipefs -a $device); if it is Chroma's, label it (e2label $device $label)."
elif ! first_mib_is_zero "$device"; then
	fail "$device (LUN $lun) has no filesystem signature but its first MiB is not blank. Refusing to format it; wipe it first if its data may go."
else
	log "$device (LUN $lun) is blank; making an ext4 filesystem labelled $label."
	# No -F: mke2fs asks before overwriting anything it recognises, and there is no one to say yes.
	mkfs.ext4 -q -L "$label" -- "$device" </dev/null
fi

if ! label_link_appears "$device"; then
	log "udev has not linked /dev/disk/by-label/$label yet; the mount waits for it."
fi
