"""The loop: eval -> human review -> chosen/rejected pairs -> DPO -> a registered adapter that prefers the chosen.

All on the tiny random Llama: the "SFT adapter" is a random LoRA registered as bot@1,
the review is filled in code, DPO runs a few steps of TRL's DPOTrainer on top of it.
The whole loop with training is marked ``slow`` (``pytest -m slow tests/test_dpo.py``);
the pairs format and every bad input run in the default suite.
"""
from __future__ import annotations

import csv
import json

import pytest

from loradex.evals import evaluate
from loradex.evals.review import export_sheet, import_sheet, review_pairs, write_pairs
from loradex.hub.errors import Conflict, InvalidConfig, InvalidData
from loradex.hub.registry import register_adapter
from loradex.training.config import TrainConfig
from loradex.training.dpo import pair_logprobs, read_pairs
from tests.helpers import make_adapter, run_cli

SYSTEM = {"role": "system", "content": "You answer in one word."}
PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello.", "Give me a fruit.", "Pick a number.",
           "Greet me.", "Name an animal.", "Say goodbye."]


@pytest.fixture
def reviewed(catalog, store, settings, tiny_base, tiny_base_dir, tmp_path):
    """bot@1 evaluated on 8 items, a review round of all 8 rated: base wins 5, adapter 2, one tie."""
    data = tmp_path / "held_out.jsonl"
    rows = [{"messages": ([SYSTEM] if i == 0 else []) + [{"role": "user", "content": p},
                                                        {"role": "assistant", "content": f"answer {i}"}]}
            for i, p in enumerate(PROMPTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = make_adapter(tiny_base_dir, tmp_path / "bot", r=4, alpha=8, scale=0.5, seed=3)
    register_adapter(catalog, store, folder, "bot", base="tiny")
    evaluate(catalog, store, "bot", data, metrics=("exact",), max_new_tokens=6, settings=settings, quantize="none")
    sheet = tmp_path / "sheet.csv"
    res = export_sheet(catalog, "bot@1", sheet, n=len(PROMPTS), seed=0)
    key = {r["row_id"]: r for r in catalog.query("SELECT * FROM review_items WHERE review_id = ?", [res["review_id"]])}
    with open(sheet, newline="", encoding="utf-8") as f:
        sheet_rows = list(csv.DictReader(f))
    for i, row in enumerate(sheet_rows):
        adapter_wins = i in (1, 2)
        row["rating"] = "3" if i == 0 else ("1" if key[row["row_id"]]["adapter_is_a"] == adapter_wins else "5")
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(sheet_rows[0]))
        w.writeheader()
        w.writerows(sheet_rows)
    import_sheet(catalog, sheet)
    return res["review_id"], data, {r["row_id"]: r for r in sheet_rows}, key


def _margin(base_dir, adapter_dir, rows) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter_dir))
    pairs = pair_logprobs(model, tok, rows)
    return sum(c - r for c, r in pairs) / len(pairs)


def test_review_to_pairs(catalog, store, settings, tiny_base_dir, reviewed, tmp_path):
    review_id, data, sheet_rows, key = reviewed
    res = review_pairs(catalog, review_id)
    identical = sum(1 for rid, it in key.items()
                    if it["adapter_output"] == it["base_output"] and sheet_rows[rid]["rating"] != "3")
    assert res["ties"] == 1 and res["identical"] == identical and res["n"] == len(PROMPTS) - 1 - identical
    assert res["prompt_source"] == f"eval data {data}"
    by_prompt = {json.dumps(p["prompt"]): p for p in res["pairs"]}
    for p in res["pairs"]:
        item = key[p["review"]["row_id"]]
        winner = p["review"]["preferred"]
        assert p["chosen"] == [{"role": "assistant", "content": item[f"{winner}_output"]}]
        loser = "base" if winner == "adapter" else "adapter"
        assert p["rejected"] == [{"role": "assistant", "content": item[f"{loser}_output"]}]
        assert p["prompt"][-1] == {"role": "user", "content": item["prompt"]}
    system_rows = [p for p in res["pairs"] if p["prompt"][0] == SYSTEM]
    tie_prompt = next(it["prompt"] for rid, it in key.items() if sheet_rows[rid]["rating"] == "3")
    assert len(system_rows) == (0 if tie_prompt == PROMPTS[0] else 1)  # the data file's system turn is kept
    assert len(by_prompt) == res["n"]

    pairs_file = write_pairs(res, tmp_path / "pairs.jsonl")
    rows, _ = read_pairs(pairs_file)
    assert [r["chosen"] for r in rows] == [p["chosen"] for p in res["pairs"]]


@pytest.mark.slow  # a real TRL DPO run in a CLI process: about a minute here (opt-in: pytest -m slow tests/test_dpo.py)
def test_pairs_to_dpo_raises_the_margin(catalog, store, settings, tiny_base_dir, reviewed, tmp_path):
    review_id, *_ = reviewed
    pairs_file = write_pairs(review_pairs(catalog, review_id), tmp_path / "pairs.jsonl")
    rows, _ = read_pairs(pairs_file)
    parent = catalog.one("SELECT * FROM adapter_versions WHERE adapter = 'bot' AND version = 1")
    catalog.close()
    # the CLI takes the base and the quantization (none) from --from
    r = run_cli("train", "--method", "dpo", "--data", str(pairs_file), "--name", "bot-dpo", "--from", "bot@1",
                "--max-steps", "8", "--batch-size", "4", "--learning-rate", "5e-3", "--warmup-ratio", "0",
                "--lr-scheduler", "constant", "--logging-steps", "1", "--output-dir", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "dpo" and out["quantization"] == "none" and out["steps"] == 8
    from loradex.hub.catalog import Catalog

    with Catalog.open(settings.catalog_path) as cat:
        v = cat.one("SELECT * FROM adapter_versions WHERE adapter = 'bot-dpo' AND version = 1")
        run = cat.one("SELECT * FROM training_runs WHERE id = ?", [out["run_id"]])
    assert (v["base"], v["rank"]) == ("tiny", 4)  # the parent's LoRA, continued
    assert "--method dpo" in v["source"] and "from bot@1" in v["source"]
    assert run["status"] == "completed" and run["method"] == "dpo" and run["parent_version_id"] == parent["id"]
    assert run["adapter_version_id"] == v["id"] and run["steps"] == 8 and run["loss_curve"]
    assert run["preference"]["margin_after"] > run["preference"]["margin_before"]
    assert out["preference"] == run["preference"]
    adapter_dir = tmp_path / "run" / "adapter"
    saved = json.loads((adapter_dir / "loradex_train_config.json").read_text())
    assert saved["method"] == "dpo" and saved["resolved"]["reference"] == "frozen copy of bot@1"
    assert not (adapter_dir / "ref").exists()  # TRL's reference copy is not the adapter

    # measured independently: the registered adapter prefers the chosen answers more than bot@1 did
    before = _margin(tiny_base_dir, store.root / parent["path"], rows)
    after = _margin(tiny_base_dir, store.root / v["path"], rows)
    assert after > before
    assert before == pytest.approx(run["preference"]["margin_before"], abs=1e-3)
    assert after == pytest.approx(run["preference"]["margin_after"], abs=1e-3)
    r = run_cli("show", "bot-dpo")
    assert r.returncode == 0 and "DPO, 8 steps" in r.stdout and "preference   margin log p(chosen)" in r.stdout, r.stdout


def test_pairs_and_dpo_bad_input(catalog, store, settings, reviewed, tmp_path):
    review_id, *_ = reviewed
    export = export_sheet(catalog, "bot@1", tmp_path / "again.csv", n=2, seed=1)
    with pytest.raises(Conflict, match="has no ratings yet"):
        review_pairs(catalog, export["review_id"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InvalidData, match="line 1: a preference row needs prompt, chosen and rejected"):
        read_pairs(bad)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(InvalidData, match="chosen and rejected are the same answer"):
        read_pairs(same)
    with pytest.raises(InvalidConfig, match="--from continues an adapter"):
        TrainConfig(data="x", name="y", from_ref="bot@1")
    with pytest.raises(InvalidConfig, match="--method must be one of sft, dpo"):
        TrainConfig(data="x", name="y", method="ppo")

    catalog.close()
    out = tmp_path / "cli-pairs.jsonl"
    r = run_cli("review", "pairs", str(review_id), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "chosen/rejected pairs" in r.stdout and "loradex train --method dpo" in r.stdout
    assert len(read_pairs(out)[0]) == len([x for x in out.read_text().splitlines() if x])
    for args, message in [(("review", "pairs", str(export["review_id"]), "-o", str(out)), "has no ratings yet"),
                          (("train", "--method", "dpo", "--data", str(bad), "--name", "z", "--from", "bot@1"),
                           "a preference row needs prompt, chosen and rejected"),
                          (("train", "--method", "dpo", "--data", str(out), "--name", "z", "--from", "nope@1"),
                           "not found")]:
        r = run_cli(*args)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
