#!/usr/bin/env bash
# The Chroma container's entrypoint, on the VM and on the local stack: `chroma-start.sh chroma run /config.yaml`.
#
# Chroma never fsyncs its vector indexes, so a start after a crash (kill -9, OOM kill, host crash,
# a restored snapshot) may open a broken one. Every start therefore asks the guard (the
# chroma-guard container, `chroma_data.py guard`) to check the data first, and waits for its
# approval: after an unclean stop the guard moves the vector indexes aside, and Chroma rebuilds
# them from its write log. After a clean stop (SIGTERM, exit 0), this script leaves the marker
# that tells the guard so.
set -euo pipefail

data_dir=${CHROMA_DATA_DIR:-/data}
approval_timeout=${CHROMA_APPROVAL_TIMEOUT_SECONDS:-300}

log() { echo "chroma-start: $*"; }

# The OOM killer picks other processes first: SIGKILL is what breaks Chroma's indexes. Compose sets
# this on the VM; Docker's API as the local stack uses it has no such option, so ask here too
# (lowering it needs CAP_SYS_RESOURCE).
if [[ -n ${CHROMA_OOM_SCORE_ADJ:-} ]]; then
	if echo "$CHROMA_OOM_SCORE_ADJ" >/proc/self/oom_score_adj 2>/dev/null; then
		log "oom_score_adj set to $CHROMA_OOM_SCORE_ADJ"
	else
		log "could not set oom_score_adj to $CHROMA_OOM_SCORE_ADJ (needs CAP_SYS_RESOURCE); keeping $(</proc/self/oom_score_adj)"
	fi
fi

# First start on an empty disk: the log flag lives in Chroma's database, which Chroma creates at its
# first start, and it protects only writes made after it. So Chroma first creates the database on a
# private port that no client reaches, stops cleanly, and the guard sets the flag before the real start.
if [[ ! -f "$data_dir/chroma.sqlite3" ]]; then
	bootstrap_port=${CHROMA_BOOTSTRAP_PORT:-8001}
	log "first start: Chroma creates its database on private port $bootstrap_port"
	CHROMA_PORT=$bootstrap_port "$@" &
	bootstrap=$!
	until [[ -f "$data_dir/chroma.sqlite3" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$bootstrap_port") 2>/dev/null; do
		if ! kill -0 "$bootstrap" 2>/dev/null; then
			wait "$bootstrap" || true
			log "Chroma exited before it had created its database"
			exit 1
		fi
		sleep 0.2
	done
	kill -TERM "$bootstrap"
	if wait "$bootstrap"; then
		date -u +%Y-%m-%dT%H:%M:%SZ >"$data_dir/.clean-shutdown"
		sync "$data_dir/.clean-shutdown" "$data_dir"
	fi
	log "first start: database created"
fi

request="start-$$-$(date +%s%N)"
rm -f "$data_dir/.ready" "$data_dir/.start-approved"
echo "$request" >"$data_dir/.start-requested"
log "waiting for the guard to check $data_dir ($request)"
waited=0
until [[ -f $data_dir/.start-approved && $(<"$data_dir/.start-approved") == "$request" ]]; do
	if ((waited >= approval_timeout * 2)); then
		log "no approval from the guard within ${approval_timeout}s: is the chroma-guard container running?"
		exit 1
	fi
	sleep 0.5
	waited=$((waited + 1))
done
log "approved; starting $*"

terminated=false
"$@" &
child=$!
# shellcheck disable=SC2317 # called by the trap below
forward() {
	terminated=true
	kill -TERM "$child" 2>/dev/null || true
}
trap forward TERM INT
status=0
while true; do
	if wait "$child"; then status=0; else status=$?; fi
	# A trapped signal interrupts `wait`; go on waiting for Chroma itself to exit.
	kill -0 "$child" 2>/dev/null || break
done

if [[ $terminated == true && $status == 0 ]]; then
	date -u +%Y-%m-%dT%H:%M:%SZ >"$data_dir/.clean-shutdown"
	# Durable before the container is gone: a marker lost to a crash only costs a rebuild, but a
	# marker that survives a later crash would skip a needed one, so the guard removes it durably too.
	sync "$data_dir/.clean-shutdown" "$data_dir"
	log "stopped cleanly; next start keeps the indexes"
else
	log "Chroma exited with $status without a clean stop; next start rebuilds the vector indexes"
fi
exit "$status"
