#!/usr/bin/env bash
# The AMQP 0-9-1 suite: pika (blocking + select), py-amqp/kombu and Debian's
# amqp-tools against the real binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$root/conformance/logs"
exec "$root/conformance/.venv/bin/python" -m pytest "$here" -q -p no:cacheprovider \
  --timeout=300 --junitxml="$root/conformance/logs/$(basename "$here").xml" "$@"
