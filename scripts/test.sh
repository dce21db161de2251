#!/usr/bin/env bash
# The test command: creates .venv on first use, then lint, format check and every test tier.
# Extra arguments go to pytest (e.g. scripts/test.sh -k settings).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
	echo "Creating .venv ..."
	python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

echo "ruff check"
.venv/bin/ruff check .
echo "ruff format --check"
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
