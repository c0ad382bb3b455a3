"""Training stage: LoRA / QLoRA fine-tuning that records its run and registers its adapter.

    from loradex.training import TrainConfig, train
    result = train(TrainConfig(data="train.jsonl", name="my-adapter"))

See docs/training.md; the CLI is ``loradex train`` / ``loradex plan`` (training/cli.py).
"""
from loradex.training.config import TrainConfig
from loradex.training.run import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
