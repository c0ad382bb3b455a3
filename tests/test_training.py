"""Fast training tests on the tiny random Llama: a real run, its records, interrupt -> resume, QLoRA."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from transformers import TrainerCallback

from loradex.hub.errors import Conflict, InvalidConfig, InvalidData
from loradex.hub.store import file_sha256
from loradex.training import TrainConfig, TrainResult, train
from loradex.training.config import CONFIG_FILE, load_config

QUESTIONS = ["What is the capital of France?", "Name a color.", "What sound does a cow make?",
             "What is 2 plus 2?", "Give me a tip for sleeping.", "What is the opposite of hot?"]


def write_chat(path: Path, n: int, style=str.upper) -> str:
    with open(path, "w") as f:
        for i in range(n):
            q = QUESTIONS[i % len(QUESTIONS)]
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": style(f"answer number {i % 4}")}]}) + "\n")
    return str(path)


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    values = dict(base="tiny", data=write_chat(tmp_path / "train.jsonl", 16), name="tiny-lora", max_steps=4,
                  batch_size=4, max_length=64, learning_rate=5e-3, save_steps=2, logging_steps=1, seed=1,
                  output_dir=str(tmp_path / "run"), quantize="none")
    values.update(kw)
    return TrainConfig(**values)


class WeightWatcher(TrainerCallback):
    """Snapshots base and LoRA parameters at the start and end of training."""

    def __init__(self):
        self.begin: dict = {}
        self.end: dict = {}

    @staticmethod
    def _snap(model) -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.begin = self._snap(model)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.end = self._snap(model)


class SendSigint(TrainerCallback):
    """Delivers a real SIGINT to this process after optimizer step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


class Crash(TrainerCallback):
    """Raises when the step after ``at`` begins (step ``at`` is checkpointed first)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise RuntimeError("simulated crash (disk full)")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_base_dir):
    """A module-wide catalog + store with the tiny base (one real run is shared by several tests)."""
    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store

    root = tmp_path_factory.mktemp("training-shared")
    settings = Settings(home=root / "home", store=root / "store")
    store = Store(settings.store)
    cat = Catalog.open(settings.catalog_path, wait_s=5)
    add_base(cat, store, "tiny", str(tiny_base_dir))
    yield root, cat, store, settings
    cat.close()


@pytest.fixture(scope="module")
def run(shared):
    """One completed tiny run with held-out data."""
    root, catalog, store, settings = shared
    eval_path = write_chat(root / "eval.jsonl", 6)
    watcher = WeightWatcher()
    config = tiny_config(root, eval_data=eval_path, description="tiny test adapter", eval_max_new_tokens=8)
    result = train(config, catalog=catalog, store=store, settings=settings, callbacks=[watcher])
    return config, result, watcher


def test_run_trains_lora_only_and_registers(run):
    config, result, watcher = run
    assert isinstance(result, TrainResult)
    lora = [n for n in watcher.begin if "lora_" in n]
    base = [n for n in watcher.begin if "lora_" not in n]
    assert lora and base
    changed = [n for n in lora if not (watcher.begin[n] == watcher.end[n]).all()]
    assert set(changed) == set(lora), "every LoRA matrix should move"
    assert all((watcher.begin[n] == watcher.end[n]).all() for n in base), "base weights must not change"
    # lora_B starts at zero; the registered adapter is not a no-op
    v = result.version
    assert v["adapter"] == "tiny-lora" and v["base"] == "tiny" and v["training_run_id"] == result.run_id
    assert v["quantization"] == "none" and v["rank"] == 16 and v["target_modules"] == ["q_proj", "v_proj"]
    assert result.steps == 4 and math.isfinite(result.final_loss) and math.isfinite(result.eval_loss)
    assert result.tokens_per_s > 0 and result.duration_s > 0


def test_run_files_beside_the_adapter(run, shared):
    config, result, _ = run
    store = shared[2]
    for folder in (result.adapter_dir, store.resolve(result.version["path"])):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", CONFIG_FILE, "loss_curve.png"} <= names
        assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result.version["files"]) >= {CONFIG_FILE, "loss_curve.png", "adapter_model.safetensors"}
    assert not list(result.output_dir.glob("checkpoint-*")), "checkpoints are removed once the adapter is registered"
    saved = json.loads((result.adapter_dir / CONFIG_FILE).read_text())
    assert saved["r"] == 16 and saved["max_steps"] == 4 and saved["data"] == str(Path(config.data).absolute())
    assert saved["resolved"]["device"] == "cpu" and saved["resolved"]["precision"] == "fp32"
    assert saved["resolved"]["warmup_steps"] == 1  # ceil(0.05 * 4)
    # the saved config reproduces the run's settings when loaded back
    again = load_config(result.adapter_dir / CONFIG_FILE)
    assert again.learning_rate == config.learning_rate and again.targets == config.targets and not again.resume


def test_run_row_is_complete(run, shared):
    config, result, _ = run
    catalog = shared[1]
    row = catalog.one("SELECT * FROM training_runs WHERE id = ?", [result.run_id])
    assert row["status"] == "completed" and row["error"] is None
    assert row["adapter"] == "tiny-lora" and row["base"] == "tiny"
    assert row["config"]["name"] == "tiny-lora" and row["config"]["resolved"]["planned_steps"] == 4
    assert Path(row["config_path"]).is_file() and row["output_dir"] == str(result.output_dir)
    assert row["data_path"] == str(Path(config.data).absolute())
    assert row["data_sha256"] == file_sha256(config.data)
    assert row["data_counts"]["train"] == 16 and row["data_counts"]["eval"] == 6
    assert row["data_counts"]["format"] == "chat" and row["data_counts"]["truncated"] == 0
    assert row["device"] == "cpu" and row["precision"] == "fp32" and row["quantization"] == "none"
    assert row["ended_at"] > row["started_at"] and row["duration_s"] > 0
    assert row["steps"] == 4 and row["tokens_seen"] > 0 and row["tokens_per_s"] > 0
    assert [s for s, _ in row["loss_curve"]] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in row["loss_curve"])
    assert row["final_loss"] == row["loss_curve"][-1][1]
    assert row["eval_loss"] == pytest.approx(result.eval_loss) and row["eval_loss_before"] is not None
    assert row["cost_usd"] > 0 and row["cost_basis"]["device_type"] == "cpu"
    assert row["cost_usd"] == pytest.approx(row["duration_s"] / 3600 * row["cost_basis"]["usd_per_hour"])
    assert Path(row["loss_png"]).is_file()
    assert row["adapter_version_id"] == result.version["id"] and row["attempts"] == 1 and row["checkpoint"] is None


def test_eval_data_is_scored_by_the_evals_stage(run, shared):
    _, result, _ = run
    ev = shared[1].one("SELECT * FROM eval_runs WHERE id = ?", [result.eval_run_id])
    assert ev["adapter_version_id"] == result.version["id"] and ev["n"] == 6
    assert "similarity" in ev["metrics"] and ev["data_sha256"] == file_sha256(run[0].eval_data)


def test_bad_data_fails_before_any_run_is_recorded(tmp_path, catalog, store, settings, tiny_base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
                   + "\n{not json\n")
    with pytest.raises(InvalidData, match="bad.jsonl:2: invalid JSON"):
        train(tiny_config(tmp_path, data=str(bad)), catalog=catalog, store=store, settings=settings)
    assert catalog.one("SELECT count(*) AS n FROM training_runs")["n"] == 0
    assert not (tmp_path / "run").exists()


def test_unknown_target_module_is_a_config_error(tmp_path, catalog, store, settings, tiny_base):
    with pytest.raises(InvalidConfig, match="--targets qq_proj match no module"):
        train(tiny_config(tmp_path, targets="q_proj,qq_proj"), catalog=catalog, store=store, settings=settings)


def test_interrupt_then_resume(tmp_path, catalog, store, settings, tiny_base):
    config = tiny_config(tmp_path, max_steps=5, save_steps=10)
    with pytest.raises(KeyboardInterrupt):
        train(config, catalog=catalog, store=store, settings=settings, callbacks=[SendSigint(at=2)])
    row = catalog.one("SELECT * FROM training_runs")
    assert row["status"] == "interrupted" and "--resume" in row["error"]
    assert row["steps"] == 2 and row["checkpoint"].endswith("checkpoint-2") and Path(row["checkpoint"]).is_dir()
    assert row["ended_at"] is not None and len(row["loss_curve"]) == 2
    assert catalog.one("SELECT count(*) AS n FROM adapter_versions")["n"] == 0

    with pytest.raises(Conflict, match="pass --resume"):
        train(config, catalog=catalog, store=store, settings=settings)

    resumed = train(TrainConfig(**{**config.to_dict(), "resume": True}), catalog=catalog, store=store,
                    settings=settings)
    assert resumed.run_id == row["id"] and resumed.steps == 5
    done = catalog.one("SELECT * FROM training_runs WHERE id = ?", [row["id"]])
    assert done["status"] == "completed" and done["attempts"] == 2 and done["error"] is None
    assert [s for s, _ in done["loss_curve"]] == [1, 2, 3, 4, 5], "the curve spans both attempts"
    assert done["duration_s"] > row["duration_s"] and done["adapter_version_id"] == resumed.version["id"]
    assert catalog.one("SELECT count(*) AS n FROM training_runs")["n"] == 1


def test_crash_is_recorded_failed_and_resumable(tmp_path, catalog, store, settings, tiny_base):
    config = tiny_config(tmp_path, max_steps=4, save_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, catalog=catalog, store=store, settings=settings, callbacks=[Crash(at=3)])
    row = catalog.one("SELECT * FROM training_runs")
    assert row["status"] == "failed" and "RuntimeError: simulated crash" in row["error"]
    assert row["checkpoint"].endswith("checkpoint-3")
    resumed = train(TrainConfig(**{**config.to_dict(), "resume": True}), catalog=catalog, store=store,
                    settings=settings)
    assert resumed.run_id == row["id"] and resumed.steps == 4


def test_resume_without_checkpoint_is_an_error(tmp_path, catalog, store, settings, tiny_base):
    with pytest.raises(InvalidConfig, match="--resume: no checkpoint"):
        train(tiny_config(tmp_path, resume=True), catalog=catalog, store=store, settings=settings)


def test_dead_running_rows_are_reaped(tmp_path, catalog, store, settings, tiny_base):
    from loradex.hub.catalog import to_json, utcnow

    catalog.execute(
        "INSERT INTO training_runs (adapter, base, config, status, started_at, pid) VALUES (?, ?, ?, 'running', ?, ?)",
        ["ghost", "tiny", to_json({}), utcnow(), 2**22 + 12345])
    train(tiny_config(tmp_path, max_steps=2), catalog=catalog, store=store, settings=settings)
    ghost = catalog.one("SELECT * FROM training_runs WHERE adapter = 'ghost'")
    assert ghost["status"] == "interrupted" and "exited without recording" in ghost["error"]


def test_qlora_nf4_path_records_quantization(tmp_path, catalog, store, settings, tiny_base):
    result = train(tiny_config(tmp_path, quantize="nf4", max_steps=2, name="tiny-qlora"), catalog=catalog,
                   store=store, settings=settings)
    assert result.version["quantization"] == "nf4"
    row = catalog.one("SELECT * FROM training_runs WHERE id = ?", [result.run_id])
    assert row["quantization"] == "nf4" and row["precision"] == "fp32" and row["status"] == "completed"


def test_cli_train_edge(tmp_path, tiny_base, catalog, capsys):
    """`loradex train`: config file + overriding flag, --json output; bad data is one line and exit code 2."""
    from loradex.cli import main

    catalog.close()  # the command opens the same catalog file itself
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"base: tiny\ndata: {write_chat(tmp_path / 'd.jsonl', 8)}\nmax_steps: 4\nbatch_size: 4\n"
                   f"max_length: 64\nlearning_rate: 0.005\nlogging_steps: 1\n")
    assert main(["train", "--config", str(cfg), "--name", "cli-lora", "--max-steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"] == "cli-lora" and out["version"] == 1 and out["steps"] == 2  # the flag beat the file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    assert main(["train", "--base", "tiny", "--data", str(bad), "--name", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl:1:" in lines[0] and "unknown role 'robot'" in lines[0]
    assert main(["train", "--base", "tiny", "--data", str(bad), "--name", "x", "--r", "0"]) == 2
    assert "--r must be an integer >= 1" in capsys.readouterr().err


def test_a_live_run_in_the_same_folder_is_refused(tmp_path, catalog, store, settings, tiny_base):
    from loradex.hub.catalog import to_json, utcnow

    out = str((tmp_path / "run").absolute())
    catalog.execute(
        "INSERT INTO training_runs (adapter, base, config, status, started_at, pid, output_dir) "
        "VALUES ('other', 'tiny', ?, 'running', ?, ?, ?)", [to_json({}), utcnow(), os.getpid(), out])
    with pytest.raises(Conflict, match="is training in"):
        train(tiny_config(tmp_path), catalog=catalog, store=store, settings=settings)


def test_bf16_precision_on_cpu_is_recorded(tmp_path, catalog, store, settings, tiny_base):
    result = train(tiny_config(tmp_path, precision="bf16", max_steps=2, name="tiny-bf16"), catalog=catalog,
                   store=store, settings=settings)
    row = catalog.one("SELECT * FROM training_runs WHERE id = ?", [result.run_id])
    assert row["precision"] == "bf16" and row["quantization"] == "none" and math.isfinite(row["final_loss"])
    assert row["config"]["resolved"]["precision"] == "bf16"


class ZeroLoraB(TrainerCallback):
    """Zeroes every lora_B when training ends: the saved adapter is a no-op."""

    def on_train_end(self, args, state, control, model=None, **kw):
        import torch

        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()


def test_one_step_smoke_run_trains_something(tmp_path, catalog, store, settings, tiny_base):
    """--max-steps 1 with the default warmup ratio: the one step must not run at learning rate 0."""
    watcher = WeightWatcher()
    result = train(tiny_config(tmp_path, max_steps=1, save_steps=50), catalog=catalog, store=store,
                   settings=settings, callbacks=[watcher])
    assert result.steps == 1 and result.version["version"] == 1
    saved = json.loads((result.adapter_dir / CONFIG_FILE).read_text())
    assert saved["resolved"]["warmup_steps"] == 0
    lora_b = [n for n in watcher.begin if "lora_B" in n]
    assert lora_b and all(not (watcher.begin[n] == watcher.end[n]).all() for n in lora_b)


def test_noop_adapter_then_allow_noop_in_the_same_folder(tmp_path, catalog, store, settings, tiny_base):
    """The no-op refusal names --allow-noop, which train has; the finished run's folder is then reusable."""
    from loradex.hub.errors import InvalidAdapter

    config = tiny_config(tmp_path, max_steps=1, save_steps=50)
    with pytest.raises(InvalidAdapter, match="pass --allow-noop"):
        train(config, catalog=catalog, store=store, settings=settings, callbacks=[ZeroLoraB()])
    assert list(Path(config.output_dir).glob("checkpoint-*")), "the finished loop left its last checkpoint"
    result = train(TrainConfig(**{**config.to_dict(), "allow_noop": True}), catalog=catalog, store=store,
                   settings=settings, callbacks=[ZeroLoraB()])
    assert result.version["version"] == 1 and result.steps == 1
    statuses = [r["status"] for r in catalog.query("SELECT status FROM training_runs ORDER BY id")]
    assert statuses == ["failed", "completed"]


def test_unfinished_checkpoints_still_need_resume(tmp_path, catalog, store, settings, tiny_base):
    config = tiny_config(tmp_path)
    ckpt = Path(config.output_dir) / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    with pytest.raises(Conflict, match="holds checkpoints of an unfinished run"):
        train(config, catalog=catalog, store=store, settings=settings)


def test_cli_train_has_allow_noop():
    import argparse

    from loradex.training.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["train", "--data", "d.jsonl", "--name", "x", "--allow-noop"])
    assert args.allow_noop is True


def test_training_runs_through_trl_sft_with_completion_only_loss(tmp_path, tiny_base):
    """SFTTrainer with loradex's settings pinned, and its loss is the cross-entropy of the completion tokens only."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    from loradex.hub.loading import load_tokenizer
    from loradex.training.data import IGNORE, collate, load_dataset
    from loradex.training.run import _build_trainer

    config = tiny_config(tmp_path, max_steps=2)
    tok = load_tokenizer(tiny_base["path"])
    ds = load_dataset(config.data, tok, config.max_length)
    trainer = _build_trainer(config, tiny_base, tmp_path / "out", "cpu", "fp32", 0, False, ds, None, tok, [])
    assert isinstance(trainer, SFTTrainer)
    args = trainer.args
    assert (args.learning_rate, args.max_length, args.bf16, args.activation_checkpointing, args.packing) == (
        config.learning_rate, config.max_length, False, False, False)
    batch = collate(ds.rows[:4], tok.pad_token_id)
    assert (batch["labels"][:, :3] == IGNORE).all(), "prompt tokens carry no loss"
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert torch.allclose(loss, manual, rtol=1e-4), (float(loss), float(manual))
