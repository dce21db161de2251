#!/usr/bin/env bash
# Finds Chroma's data disk by LUN, waits for it to appear, and makes an ext4 filesystem on it
# only when the device is blank. It runs at every boot, so a replacement VM that attaches the
# same disk finds its filesystem and keeps the data.
#
# It never forces mkfs, and it decides "blank" by reading the device itself, not udev's database:
# cloud-init's lsblk-based check has erased a disk that udev had no record of. Blank means no
# signature at offset 0 (blkid -p), no partition table (primary or backup GPT header, MBR boot
# signature), and zeros where partitions live: the first and last 16 MiB. That catches a disk whose
# partition table was wiped or whose primary GPT header was zeroed, and reads 32 MiB, whatever
# the disk's size.
set -euo pipefail

lun="${DATA_DISK_LUN:-0}"
label="${DATA_DISK_LABEL:-chroma-data}"
wait_seconds="${DATA_DISK_WAIT_SECONDS:-300}"
# How much of each end of the disk must read as zeros before it counts as blank.
window_bytes=$((16 * 1024 * 1024))
# How often the wait asks udev to replay block devices' "add" events.
retrigger_seconds=30
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
	local deadline=$((SECONDS + wait_seconds)) next_trigger=$SECONDS
	until find_device; do
		if ((SECONDS >= deadline)); then
			fail "no data disk appeared at LUN $lun within ${wait_seconds}s (looked for ${candidates[*]}). Attach the disk at LUN $lun; Chroma stays stopped until it is there."
		fi
		log "waiting for the data disk at LUN $lun ($((deadline - SECONDS))s left)"
		if ((SECONDS >= next_trigger)); then
			# Rules installed after the disk was seen (azure-vm-utils, added by cloud-init) act only
			# on a new "add" event.
			udevadm trigger --subsystem-match=block --action=add 2>/dev/null || true
			next_trigger=$((SECONDS + retrigger_seconds))
		fi
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

# Whether `length` bytes from `offset` all read as zero. A short or failed read counts as not zero.
zeros_at() {
	local device=$1 offset=$2 length=$3
	dd if="$device" bs=1M iflag=skip_bytes,count_bytes skip="$offset" count="$length" status=none |
		cmp --silent --bytes="$length" - /dev/zero
}

# The 8 bytes at `offset`, as text (NULs dropped).
bytes_at() {
	dd if="$1" bs=1 skip="$2" count="$3" status=none | tr -d '\0'
}

# Prints what makes the device not blank, or "blank" once every check has passed: anything else,
# an empty answer included, keeps the disk untouched. Reads the two windows and a few sectors.
not_blank_reason() {
	local device=$1 size=$2 window=$3 sector
	for sector in 512 4096; do
		if ((size >= 2 * sector)) && [[ "$(bytes_at "$device" "$sector" 8)" == "EFI PART" ]]; then
			echo "a GPT partition table (primary header)"
			return
		fi
		if ((size >= 2 * sector)) && [[ "$(bytes_at "$device" $((size - sector)) 8)" == "EFI PART" ]]; then
			echo "a backup GPT partition table at its end (the primary header is gone, the partitions may not be)"
			return
		fi
	done
	if [[ "$(od -An -tx1 -j510 -N2 -- "$device" | tr -d ' \n')" == 55aa ]]; then
		echo "an MBR boot signature"
		return
	fi
	local offset found
	for offset in 1048576 32256; do
		found=$(blkid -p -O "$offset" -o export -- "$device" 2>/dev/null | sed -n 's/^TYPE=//p')
		if [[ -n "$found" ]]; then
			echo "$found at offset $((offset / 512)) sectors, where a partition starts (its partition table was wiped)"
			return
		fi
	done
	if ! zeros_at "$device" 0 "$window"; then
		echo "data in its first $((window / 1048576)) MiB, where partitions start"
	elif ! zeros_at "$device" $((size - window)) "$window"; then
		echo "data in its last $((window / 1048576)) MiB, where partitions end and a backup GPT lives"
	else
		echo blank
	fi
}

# How to make the disk blank when its data may go. `wipefs -a` on the disk alone is not enough: it
# removes the partition table's signatures and leaves the partitions' data, which this script refuses.
wipe_hint() {
	local device=$1 size_mib=$(($2 / 1048576)) window_mib=$((window_bytes / 1048576))
	echo "If its data may go: wipefs -a each of its partitions, then zero both ends: dd if=/dev/zero of=$device bs=1M count=$window_mib && dd if=/dev/zero of=$device bs=1M seek=$((size_mib > window_mib ? size_mib - window_mib : 0)) count=$window_mib; then restart chroma-data-disk.service. If its data must stay, attach a blank disk at LUN $lun instead."
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
	fail "$device (LUN $lun) holds ${fs_type:-a $table_type partition table}${fs_label:+ labelled $fs_label}, not an ext4 filesystem labelled $label. Refusing to format it; nothing was written. If it is Chroma's, label it (e2label $device $label). $(wipe_hint "$device" "$(blockdev --getsize64 "$device")")"
else
	size=$(blockdev --getsize64 "$device")
	window=$((size < window_bytes ? size : window_bytes))
	reason=$(not_blank_reason "$device" "$size" "$window")
	if [[ "$reason" != blank ]]; then
		fail "$device (LUN $lun) has no filesystem signature at its start but holds ${reason:-something the checks could not read}. Refusing to format it; nothing was written. $(wipe_hint "$device" "$size")"
	fi
	log "$device (LUN $lun) is blank: no signature, no partition table, zeros in its first and last $((window / 1048576)) MiB (read $((2 * window / 1048576)) MiB of $((size / 1048576)) MiB); making an ext4 filesystem labelled $label."
	# No -F: mke2fs asks before overwriting anything it recognises, and there is no one to say yes.
	mkfs.ext4 -q -L "$label" -- "$device" </dev/null
fi

if ! label_link_appears "$device"; then
	log "udev has not linked /dev/disk/by-label/$label yet; the mount waits for it."
fi
