#!/usr/bin/env bash
# The whole test suite, from a bare machine: installs what the tests need
# (Debian packages, a Python venv with pinned clients), builds the workspace,
# runs `cargo test --workspace` and every conformance suite against the real
# binary, and ends with the line `N passed, N failed`.
#
#   conformance/run.sh              everything
#   SUITES="echo kafka" conformance/run.sh     only these conformance suites
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
logs="$root/conformance/logs"
mkdir -p "$logs"
rm -f "$logs"/*.xml

say() { printf '\n==> %s\n' "$*"; }

# ---- 1. system packages ----------------------------------------------------
need=()
command -v kcat >/dev/null || need+=(kcat)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v amqp-publish >/dev/null || need+=(amqp-tools)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v curl >/dev/null || need+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# ---- 2. Python venv with pinned clients ------------------------------------
venv="$root/conformance/.venv"
stamp="$venv/.requirements.sha256"
want=$(sha256sum conformance/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "creating the Python venv (conformance/requirements.txt)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r conformance/requirements.txt
  echo "$want" > "$stamp"
fi

# ---- 2b. Node client (MQTT.js, pinned) --------------------------------------
node_dir="$root/conformance/.node"
if [ ! -f "$node_dir/node_modules/mqtt/package.json" ]; then
  say "installing MQTT.js into conformance/.node"
  npm install -q --no-audit --no-fund --prefix "$node_dir" mqtt@5.16.0
fi

# ---- 3. build + unit/integration tests -------------------------------------
passed=0; failed=0
say "cargo build --release"
if ! cargo build --release --workspace --bins; then
  echo "BUILD FAILED"
  echo "0 passed, 1 failed"
  exit 1
fi
# Formatting counts as one check (rustfmt ships with the toolchain; a
# toolchain without it says so and skips the check).
if cargo fmt --version >/dev/null 2>&1; then
  say "cargo fmt --all -- --check"
  if cargo fmt --all -- --check >/dev/null; then
    passed=$((passed + 1)); echo "format: ok"
  else
    failed=$((failed + 1)); echo "format: unformatted code (run cargo fmt --all)"
  fi
else
  echo "format: not checked (no rustfmt in this toolchain)"
fi
say "cargo test --release --workspace --no-fail-fast"
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$logs/cargo-test.log"
cargo_rc=${PIPESTATUS[0]}
read -r cp cf < <(python3 - "$logs/cargo-test.log" <<'PY'
import re, sys
p = f = 0
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"test result: \w+\. (\d+) passed; (\d+) failed", line)
    if m:
        p += int(m.group(1)); f += int(m.group(2))
print(p, f)
PY
)
if [ "$cargo_rc" -ne 0 ] && [ "$cf" -eq 0 ]; then cf=1; fi  # e.g. a test target failed to build
passed=$((passed + cp)); failed=$((failed + cf))
echo "cargo test: $cp passed, $cf failed"

# ---- 4. conformance suites against the real binary ---------------------------
export MANIFOLD_BIN="$root/target/release/manifold"
suites=${SUITES:-$(for d in conformance/*/run.sh; do basename "$(dirname "$d")"; done)}
for s in $suites; do
  say "conformance suite: $s"
  "conformance/$s/run.sh"
  rc=$?
  read -r sp sf sa < <(python3 conformance/summarize.py "$logs/$s.xml" "conformance/$s/allow.txt" "$rc")
  echo "suite $s: $sp passed, $sf failed, $sa allowed failures (see conformance/$s/FINDINGS.md)"
  passed=$((passed + sp)); failed=$((failed + sf))
done

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
