#!/usr/bin/env bash
# The MQTT suite: paho-mqtt (3.1, 3.1.1, 5, WebSocket), mosquitto_pub/sub and
# a Kafka client against the real binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$root/conformance/logs"
exec "$root/conformance/.venv/bin/python" -m pytest "$here" -q -p no:cacheprovider \
  --timeout=300 --junitxml="$root/conformance/logs/$(basename "$here").xml" "$@"
