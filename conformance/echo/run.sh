#!/usr/bin/env bash
# The host suite: the real binary serving the test kit's echo handler.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$root/conformance/logs"
exec "$root/conformance/.venv/bin/python" -m pytest "$here" -q -p no:cacheprovider \
  --timeout=300 --junitxml="$root/conformance/logs/$(basename "$here").xml" "$@"
