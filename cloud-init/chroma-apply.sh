#!/usr/bin/env bash
# Applies the runtime config that the VM's run command carries, doing the least that works:
#   - token changed (authToken): the token file is replaced atomically (a new file, then `mv`).
#     Caddy reads that file at every request, so the next request is checked against the new
#     token: no reload, no restart, no connection closed, Chroma not touched.
#   - proxy config changed (authHeader, acmeEmail): `caddy reload` in the proxy container. Caddy
#     swaps its config in place, keeping its listeners, and Chroma is not touched; but a reload
#     retires the old config's server, which may cut off a request that arrives in that instant.
#   - compose file changed (OTel settings: Chroma's environment; chromaVersion: its image): pull a
#     new image first, while the old container still serves, then `docker compose up`, which
#     recreates only the services whose definition changed (Chroma alone, for these keys). Chroma
#     stops with SIGTERM and starts through its container's entrypoint (chroma-start.sh, which waits
#     for the data guard's check), as at boot. If it is not healthy within the bound, the previous
#     compose file is put back and started again.
#   - nothing changed: nothing is touched. Azure may run the command again (see below).
#   - Chroma not running yet (the VM's first run): the files go in and chroma.service starts.
# In that order: the proxy config first, so that a config Caddy refuses leaves the token as it was.
# It reports the image that runs, and fails if that is not the one asked for.
#
# Input, as Azure's run command agent passes parameters (environment variables):
#   CHROMA_IMAGE          the Chroma image the compose file names (a plain parameter)
#   CHROMA_CADDYFILE_B64  the proxy config, base64 (a plain parameter: it holds no secret)
#   CHROMA_AUTH_TOKEN     the token, RFC 6750 token68 (protected)
#   CHROMA_COMPOSE_B64    the compose file, base64 (protected: it may hold OTel headers)
# Secrets are never printed. The other CHROMA_* variables below exist for tests; the VM uses the
# defaults.
#
# What this relies on in Azure, which nothing here can run:
#   - `docker compose up --wait-timeout` needs compose v2.17 or later; Ubuntu 24.04 ships a later one.
#   - The agent may start a run command while cloud-init is still installing Docker (extensions
#     are handled once the VM reports ready, which is before cloud-init's final stage), so the
#     script waits for cloud-init's boot-finished file first.
#   - A managed run command runs once per create or update, not at each boot. A reboot needs no
#     run: the files it wrote stay in /etc/chroma on the OS disk and chroma.service starts from
#     them. A new VM (replacement) gets the run command anew, because Pulumi replaces it with the VM.
#   - If the agent does run it again with the same input, nothing changes (every step compares first).
set -euo pipefail

config_dir=${CHROMA_CONFIG_DIR:-/etc/chroma}
boot_finished=${CHROMA_BOOT_FINISHED:-/var/lib/cloud/instance/boot-finished}
boot_wait_seconds=${CHROMA_BOOT_WAIT_SECONDS:-1200}
healthy_within_seconds=${CHROMA_HEALTHY_WITHIN_SECONDS:-180}
unit=${CHROMA_UNIT:-chroma.service}
compose_file=$config_dir/compose.yaml
# A directory mount in the proxy container (at /etc/caddy): a file mount would keep the replaced
# file's inode, and Caddy would go on reading the old config or token.
caddyfile=$config_dir/proxy/Caddyfile
caddyfile_in_container=/etc/caddy/Caddyfile
# Root only (mode 0600, owner root): Caddy's image runs as root, and nothing else needs it.
token_file=$config_dir/proxy/token
# RFC 6750 token68, as the proxy's pattern wants it; also keeps a newline or space out of the file.
token68='^[A-Za-z0-9._~+/-]+=*$'
compose=(docker compose --file "$compose_file")

log() { printf 'chroma-apply: %s\n' "$*"; }
fail() {
	log "ERROR: $*"
	exit 1
}

for name in CHROMA_IMAGE CHROMA_CADDYFILE_B64 CHROMA_AUTH_TOKEN CHROMA_COMPOSE_B64; do
	[[ -n ${!name:-} ]] || fail "$name is empty: the run command must pass it (components/runtime_config.py)"
done
[[ $CHROMA_AUTH_TOKEN =~ $token68 ]] || fail "CHROMA_AUTH_TOKEN is not RFC 6750 token68 (letters, digits, -._~+/ and trailing =); it is not shown"

wait_for_boot() {
	local deadline=$((SECONDS + boot_wait_seconds))
	until [[ -e $boot_finished ]]; do
		((SECONDS < deadline)) || fail "cloud-init has not finished within ${boot_wait_seconds}s ($boot_finished is missing)"
		log "waiting for cloud-init to finish the bootstrap ($((deadline - SECONDS))s left)"
		sleep 5
	done
}

# Writes stdin to $1 through a temporary file in the same directory, so a reader sees the old
# file or the new one, never half of one.
replace_file() {
	local target=$1 temporary
	temporary=$(mktemp "$target.XXXXXX")
	cat >"$temporary"
	chmod 0600 "$temporary"
	mv -f -- "$temporary" "$target"
}

differs() { ! cmp --silent -- "$1" "$2" 2>/dev/null; }

running_image() {
	local container
	container=$("${compose[@]}" ps --quiet chroma 2>/dev/null || true)
	if [[ -z $container ]]; then
		echo "nothing"
		return
	fi
	docker inspect --format '{{.Config.Image}}' "$container"
}

pull_if_missing() {
	if docker image inspect "$CHROMA_IMAGE" >/dev/null 2>&1; then
		return 0
	fi
	log "pulling $CHROMA_IMAGE (whatever runs keeps serving meanwhile)"
	docker pull --quiet "$CHROMA_IMAGE" >/dev/null
}

apply_proxy_config() {
	differs "$staged/Caddyfile" "$caddyfile" || return 0
	cp -p -- "$caddyfile" "$caddyfile.previous"
	replace_file "$caddyfile" <"$staged/Caddyfile"
	if ! "${compose[@]}" exec -T proxy caddy reload --config "$caddyfile_in_container" --adapter caddyfile; then
		mv -f -- "$caddyfile.previous" "$caddyfile"
		fail "Caddy refused the new proxy config; the previous one stays in force"
	fi
	log "proxy config reloaded in place (header or email); Chroma untouched"
}

apply_token() {
	differs "$staged/token" "$token_file" || return 0
	replace_file "$token_file" <"$staged/token"
	log "token replaced; Caddy reads it at each request: no reload, no restart, Chroma untouched"
}

apply_compose() {
	differs "$staged/compose.yaml" "$compose_file" || return 0
	pull_if_missing || fail "could not pull $CHROMA_IMAGE; nothing was changed and $(running_image) still runs"
	cp -p -- "$compose_file" "$compose_file.previous"
	replace_file "$compose_file" <"$staged/compose.yaml"
	log "recreating what changed in the compose file (Chroma's image or environment)"
	if "${compose[@]}" up --detach --wait --wait-timeout "$healthy_within_seconds"; then
		return 0
	fi
	log "not healthy within ${healthy_within_seconds}s: rolling back to the previous compose file"
	replace_file "$compose_file" <"$compose_file.previous"
	if ! "${compose[@]}" up --detach --wait --wait-timeout "$healthy_within_seconds"; then
		fail "the previous compose file did not become healthy either; see docker compose --file $compose_file logs chroma"
	fi
	fail "the new runtime config did not become healthy; rolled back, $(running_image) runs"
}

start_first_time() {
	log "Chroma is not running: installing the runtime config and starting $unit"
	pull_if_missing || fail "could not pull $CHROMA_IMAGE"
	replace_file "$caddyfile" <"$staged/Caddyfile"
	replace_file "$token_file" <"$staged/token"
	replace_file "$compose_file" <"$staged/compose.yaml"
	systemctl start "$unit" || fail "$unit did not start; see journalctl -u $unit and docker compose --file $compose_file logs"
}

umask 077
wait_for_boot
install -d -m 0700 "$config_dir" "$config_dir/proxy"
# One apply at a time: the agent runs one command per VM, but a person may run this too.
exec 9>"$config_dir/.apply.lock"
flock 9
staged=$(mktemp -d "$config_dir/.staged.XXXXXX")
trap 'rm -rf -- "$staged"' EXIT
base64 --decode <<<"$CHROMA_CADDYFILE_B64" >"$staged/Caddyfile" || fail "CHROMA_CADDYFILE_B64 is not base64"
base64 --decode <<<"$CHROMA_COMPOSE_B64" >"$staged/compose.yaml" || fail "CHROMA_COMPOSE_B64 is not base64"
printf '%s\n' "$CHROMA_AUTH_TOKEN" >"$staged/token"

if ! systemctl is-active --quiet "$unit"; then
	start_first_time
else
	if ! differs "$staged/Caddyfile" "$caddyfile" && ! differs "$staged/token" "$token_file" &&
		! differs "$staged/compose.yaml" "$compose_file"; then
		log "runtime config unchanged; nothing to do"
	fi
	apply_proxy_config
	apply_token
	apply_compose
fi

running=$(running_image)
[[ $running == "$CHROMA_IMAGE" ]] || fail "$running runs, not $CHROMA_IMAGE"
log "running $running"
