#!/usr/bin/env bash
# Deploys a stack from a fresh checkout: venv, backend, passphrase, stack, `pulumi up`, then how to
# connect. `scripts/up.sh local` needs only Docker and the Pulumi CLI; `scripts/up.sh dev` also an
# Azure login. Extra arguments go to `pulumi up`.
set -euo pipefail
cd "$(dirname "$0")/.."

stack="${1:-local}"
shift || true
fail() {
	printf 'up: %s\n' "$*" >&2
	exit 2
}

command -v pulumi >/dev/null || fail "the Pulumi CLI is not installed: https://www.pulumi.com/docs/install/"
[[ -f "Pulumi.$stack.yaml" ]] || fail "no Pulumi.$stack.yaml: use local or dev, or create the stack file first."
up_args=()
if [[ "$stack" == local ]]; then
	command -v docker >/dev/null || fail "Docker is not installed: the local stack runs Chroma in Docker."
	docker info >/dev/null 2>&1 || fail "Docker is not running (docker info failed): start Docker Desktop or dockerd."
	# State stays on this machine, in .pulumi-state/, not in Pulumi Cloud.
	export PULUMI_BACKEND_URL="${PULUMI_BACKEND_URL:-file://$PWD/.pulumi-state}"
	mkdir -p .pulumi-state
	# The local stack's secrets (the token) are encrypted with a passphrase generated once and kept
	# beside the state, owner-only; set PULUMI_CONFIG_PASSPHRASE(_FILE) to use your own.
	if [[ -z "${PULUMI_CONFIG_PASSPHRASE+set}" && -z "${PULUMI_CONFIG_PASSPHRASE_FILE:-}" ]]; then
		passphrase_file=.pulumi-state/passphrase
		if [[ ! -s "$passphrase_file" ]]; then
			(umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' >"$passphrase_file" 2>/dev/null) ||
				(umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$passphrase_file")
		fi
		export PULUMI_CONFIG_PASSPHRASE_FILE="$PWD/$passphrase_file"
	fi
	# Nothing in the cloud: no reason to stop and ask.
	up_args+=(--yes)
fi

if [[ ! -x .venv/bin/python ]]; then
	echo "Creating .venv ..."
	python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

pulumi stack select --create "$stack"
pulumi up --stack "$stack" "${up_args[@]}" "$@"

endpoint=$(pulumi stack output endpoint --stack "$stack")
header=$(pulumi stack output authHeader --stack "$stack")
cat <<EOT

Chroma is up at $endpoint (token in the $header header).
  token:   pulumi stack output authToken --show-secrets --stack $stack
  verify:  .venv/bin/python scripts/smoke_test.py --stack $stack
  destroy: scripts/down.sh $stack
EOT
