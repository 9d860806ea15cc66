#!/usr/bin/env bash
# Set up and run the checks and the whole test suite (what .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --peers
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
