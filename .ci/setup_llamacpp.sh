#!/usr/bin/env bash
# Install llama-cpp-python into the project venv, for the `llamacpp` test marker.
#
# PyPI has only the sdist of llama-cpp-python 0.3.36: it compiles llama.cpp (~5-15 minutes on
# 2 cores). The wheel is built once into a cache folder outside the repo and reused. Explicit
# CPU flags, not GGML_NATIVE: the native build died with `Illegal instruction` (AMX) on
# quantized models on these machines. AVX2/FMA/F16C always; AVX-512 (and its VBMI, VNNI and
# BF16 extensions) only where /proc/cpuinfo reports it, so that on such a CPU the benchmark
# compares loradex's AVX-512 kernels with an AVX-512 llama.cpp. One cached wheel per flag set.
# Idempotent: an installed 0.3.36 that imports exits at once; a cached wheel is installed
# without rebuilding; only a missing wheel is built.
#
#   bash .ci/setup_llamacpp.sh
#   LORADEX_PYTHON=/path/to/python LORADEX_WHEEL_CACHE=/dir bash .ci/setup_llamacpp.sh
set -euo pipefail

VERSION="0.3.36"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${LORADEX_PYTHON:-$HERE/.venv/bin/python}"
CACHE="${LORADEX_WHEEL_CACHE:-/root/.cache/loradex/wheels}"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true) "
VARIANT="avx2"
has() { for f in "$@"; do [[ "$FLAGS" == *" $f "* ]] || return 1; done; }
if has avx512f avx512cd avx512vl avx512dq avx512bw; then
  CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512=ON"
  VARIANT="avx512"
  if has avx512vbmi; then CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512_VBMI=ON"; VARIANT="$VARIANT-vbmi"; fi
  if has avx512_vnni; then CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512_VNNI=ON"; VARIANT="$VARIANT-vnni"; fi
  if has avx512_bf16; then CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512_BF16=ON"; VARIANT="$VARIANT-bf16"; fi
fi
export CMAKE_ARGS
CACHE="$CACHE/$VARIANT"

MARK="$("$PY" -c 'import sys; print(sys.prefix)')/.loradex-llamacpp-variant"
if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" >/dev/null 2>&1 \
   && [[ "$(cat "$MARK" 2>/dev/null)" == "$VARIANT" ]]; then
  echo "setup_llamacpp: llama-cpp-python $VERSION ($VARIANT) already installed"
  exit 0
fi

mkdir -p "$CACHE"
WHEEL="$(ls "$CACHE"/llama_cpp_python-${VERSION}-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
  echo "setup_llamacpp: building llama-cpp-python $VERSION for $VARIANT (5-15 minutes)"
  # --no-cache-dir: pip's own wheel cache does not key on CMAKE_ARGS.
  "$PY" -m pip wheel --no-deps --no-cache-dir -w "$CACHE" "llama-cpp-python==$VERSION"
  WHEEL="$(ls "$CACHE"/llama_cpp_python-${VERSION}-*.whl | head -n1)"
fi
# --no-deps: its runtime deps (numpy, jinja2, typing-extensions, diskcache) are either
# already in the project venv or unused by the tests; diskcache is installed explicitly.
"$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
echo "$VARIANT" > "$MARK"
"$PY" -m pip install -q diskcache
"$PY" -c "import llama_cpp; print('setup_llamacpp: llama-cpp-python', llama_cpp.__version__)"
