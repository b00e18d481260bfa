#!/usr/bin/env bash
# Screenshot of the --trace-html replay page: docs/trace-html.png in the README.
#
#   benchmarks/screenshot_trace.sh [MODEL] [STEP]
#
# Runs `mlx_lm_llada.generate --trace-html` on MODEL (default: the golden
# tiny-gqa checkpoint; random weights, so its text is noise), then opens the
# page in headless Chromium at replay step STEP (default 40 of 64: the canvas
# mid-fill) and saves the screenshot to $OUT (default docs/trace-html.png).
# Needs Chromium (Debian: apt-get install chromium) and the project installed
# in the active Python; nothing reaches the network.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-tests/fixtures/golden/llada/tiny-gqa}
STEP=${2:-40}
OUT=${OUT:-docs/trace-html.png}
PYTHON=${PYTHON:-python}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser ||
    command -v google-chrome || true)}
if [ -z "$CHROMIUM" ]; then
    echo "Chromium not found (Debian: apt-get install chromium)" >&2
    exit 1
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

HF_HUB_OFFLINE=1 "$PYTHON" -m mlx_lm_llada.generate --model "$MODEL" \
    --prompt "Why is the sky blue?" --max-tokens 64 --block-length 16 \
    --trace "$TMP/trace.jsonl" --trace-html "$TMP/trace.html" >/dev/null

# Chromium refuses to run as root without --no-sandbox.
SANDBOX=()
[ "$(id -u)" = 0 ] && SANDBOX=(--no-sandbox)
mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless "${SANDBOX[@]}" --disable-gpu --disable-quic \
    --no-first-run --disable-background-networking --disable-component-update \
    --disable-sync --hide-scrollbars --user-data-dir="$TMP/profile" \
    --window-size=1100,620 --screenshot="$(realpath -m "$OUT")" \
    "file://$TMP/trace.html#step=$STEP" 2>/dev/null
echo "wrote $OUT"
