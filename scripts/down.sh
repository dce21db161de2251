#!/usr/bin/env bash
# Destroys a stack deployed with scripts/up.sh, keeping Chroma's data unless protectDataDisk is
# false, and says where the data is.
set -euo pipefail
cd "$(dirname "$0")/.."

stack="${1:-local}"
shift || true
command -v pulumi >/dev/null || {
	echo "down: the Pulumi CLI is not installed: https://www.pulumi.com/docs/install/" >&2
	exit 2
}
if [[ "$stack" == local ]]; then
	export PULUMI_BACKEND_URL="${PULUMI_BACKEND_URL:-file://$PWD/.pulumi-state}"
	if [[ -z "${PULUMI_CONFIG_PASSPHRASE+set}" && -z "${PULUMI_CONFIG_PASSPHRASE_FILE:-}" ]]; then
		export PULUMI_CONFIG_PASSPHRASE_FILE="$PWD/.pulumi-state/passphrase"
	fi
fi

protected=$(pulumi config get protectDataDisk --stack "$stack" 2>/dev/null || echo true)
data=$(pulumi stack output dataVolume --stack "$stack" 2>/dev/null || pulumi stack output dataDiskId --stack "$stack" 2>/dev/null || echo "")

if [[ "$stack" == local ]]; then
	pulumi destroy --stack "$stack" --yes "$@"
	if [[ "$protected" != false && -n "$data" ]]; then
		echo "Kept Docker volume $data with Chroma's data; the next scripts/up.sh local uses it again."
		echo "To delete the data too: docker volume rm $data"
	else
		echo "Deleted everything, including Chroma's data (protectDataDisk is false)."
	fi
elif [[ "$protected" != false ]]; then
	pulumi destroy --stack "$stack" --exclude-protected "$@"
	echo "Kept the data disk ${data:-(see pulumi stack)} and its resource group; the next scripts/up.sh $stack mounts it again."
	echo "To delete the data too: pulumi config set protectDataDisk false --stack $stack && pulumi up --stack $stack && scripts/down.sh $stack"
else
	pulumi destroy --stack "$stack" "$@"
	echo "Deleted everything, including the data disk (protectDataDisk is false)."
fi
