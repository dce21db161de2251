#!/usr/bin/env bash
# Moves an Azure stack's VM to another availability zone, e.g. when its zone is down:
#   scripts/failover.sh STACK ZONE [--yes] [--wait SECONDS]
# It sets `zone`, runs `pulumi up` (which replaces only the VM: the ZRS data disk, the zone-redundant
# public IP, the NIC and the DNS name stay), waits until the smoke test passes against the new VM,
# and prints the measured time to recover. --yes skips pulumi's confirmation, which the measured time
# would otherwise include; --wait is how long the smoke test waits for the heartbeat (default 900).
# Run it again with the same ZONE to resume a failover that stopped half-way.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/failover.sh STACK ZONE [--yes] [--wait SECONDS]"
fail() {
	printf 'failover: %s\n' "$*" >&2
	exit 2
}

[[ $# -ge 2 ]] || fail "$usage"
stack=$1
zone=$2
shift 2
up_args=()
wait_seconds=900
while [[ $# -gt 0 ]]; do
	case "$1" in
	--yes) up_args+=(--yes) ;;
	--wait)
		[[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || fail "--wait takes a whole number of seconds. $usage"
		wait_seconds=$2
		shift
		;;
	*) fail "unknown option '$1'. $usage" ;;
	esac
	shift
done
[[ "$zone" =~ ^[123]$ ]] || fail "ZONE must be 1, 2 or 3, not '$zone'. $usage"
command -v pulumi >/dev/null || fail "the Pulumi CLI is not installed: https://www.pulumi.com/docs/install/"
[[ -f "Pulumi.$stack.yaml" ]] || fail "no Pulumi.$stack.yaml: name an Azure stack of this project."

target=$(pulumi config get target --stack "$stack" 2>&1) || fail "cannot read stack $stack's config: $target"
[[ "$target" == azure ]] || fail "stack $stack has target '$target': only an Azure stack has zones to fail over."
current=$(pulumi config get zone --stack "$stack" 2>/dev/null || true)
# Without a zone the data disk may be LRS and the IP is not zone-redundant, so a zone change would
# be a migration (disk SKU, new IP), not a failover that keeps them.
[[ -n "$current" ]] || fail "stack $stack has no zone, so its disk and IP are not zone-redundant and a failover \
could not keep them. Putting a stack into a zone is a planned change: see README, 'Put an existing stack into a zone'."

if [[ ! -x .venv/bin/python ]]; then
	echo "Creating .venv ..."
	python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
fi

if [[ "$current" == "$zone" ]]; then
	echo "Stack $stack is already set to zone $zone: running pulumi up to finish the failover."
else
	echo "Failing stack $stack over from zone $current to zone $zone: only the VM is replaced."
	pulumi config set zone "$zone" --stack "$stack"
fi

start=$SECONDS
if ! pulumi up --stack "$stack" "${up_args[@]}"; then
	printf 'failover: pulumi up failed after %ss; the stack config now says zone %s.\n' $((SECONDS - start)) "$zone" >&2
	printf 'Fix what it reported and run scripts/failover.sh %s %s again to resume, or pick another zone\n' "$stack" "$zone" >&2
	echo "(a zone can lack capacity for vmSize)." >&2
	exit 1
fi
deployed=$SECONDS
echo "Waiting for the new VM to pass the smoke test (up to ${wait_seconds}s) ..."
if ! .venv/bin/python scripts/smoke_test.py --stack "$stack" --wait "$wait_seconds"; then
	printf 'failover: the smoke test failed %ss after pulumi up started; the VM is in zone %s.\n' $((SECONDS - start)) "$zone" >&2
	echo "See the failed check above; .venv/bin/python scripts/smoke_test.py --stack $stack runs it again." >&2
	exit 1
fi
healthy=$SECONDS

echo
echo "Recovered in zone $zone: $((healthy - start))s from the start of pulumi up to a passing smoke test."
printf '  %-11s %6ss  %s\n' "pulumi up" $((deployed - start)) "old VM deleted, new VM created in zone $zone"
printf '  %-11s %6ss  %s\n' "to healthy" $((healthy - deployed)) "boot, disk mount, Chroma and TLS up, smoke test passed"
if [[ ${#up_args[@]} -eq 0 ]]; then
	echo "  (includes the time pulumi up waited for your confirmation; --yes leaves it out)"
fi
