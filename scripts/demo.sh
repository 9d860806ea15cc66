#!/usr/bin/env bash
# Set up and run the node's main job on embedded defaults (SQLite, local spool,
# the demo model bundle): receive a real chest X-ray over DICOM, return a draft SR.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec cxr-node demo "$@"
