"""Many adapters in one pass on the serving engine (tiny random Llama, 3 adapters + base).

- a multi-adapter eval stores one run per adapter, each item's outputs equal to evaluating that adapter alone,
  the base generated once and shared;
- its outputs are what the serving engine answers for the same messages (one decode path);
- --batch-invariant: outputs identical with batch sizes 1, 4 and 16, and a row's tokens do not depend on
  its neighbours in the engine;
- refs, versions, aliases and --all-of; bad input gets one clear line.
"""
from __future__ import annotations

import json

import pytest

from loradex.evals import evaluate, evaluate_many
from loradex.evals.data import read_eval_set
from loradex.evals.record import get_samples
from loradex.hub.errors import InvalidConfig, NotFound
from loradex.hub.registry import register_adapter, set_alias
from tests.helpers import make_adapter

# prompts of different lengths, so batches hold rows of different lengths and compositions
PROMPTS = ["Hi.", "Name a colour you like.", "What is two plus two? Answer briefly, please.", "Say hello.",
           "Give me a fruit that is red and sweet, and say why it is good.", "Pick a number.", "Greet me.",
           "Tell me about the sea in one short sentence.", "Why?", "List three animals that live in cold places.",
           "Is water wet?", "Describe a chair to someone who has never seen one, in a few words."]
MAX_NEW = 8


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = [{"prompt": p, "completion": f"answer {i}"} for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def three(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    """alpha@1, alpha@2 and beta@1 on the tiny base (random LoRA, each changes the text)."""
    rows = []
    for name, seed in (("alpha", 1), ("alpha", 2), ("beta", 3)):
        folder = make_adapter(tiny_base_dir, tmp_path / f"{name}{seed}", r=4, alpha=8, scale=0.5, seed=seed)
        rows.append(register_adapter(catalog, store, folder, name, base="tiny"))
    return rows


def _outputs(catalog, run) -> list[tuple[str, str]]:
    return [(s["output"], s["base_output"]) for s in get_samples(catalog, run["id"])]


def test_many_equals_each_alone_item_for_item(catalog, store, settings, three, data_file):
    kw = dict(metrics=("exact", "perplexity"), max_new_tokens=MAX_NEW, batch_size=4, settings=settings)
    runs = evaluate_many(catalog, store, ["alpha@1", "alpha@2", "beta"], data_file, use_cache=False, **kw)
    assert [(r["adapter"], r["version"]) for r in runs] == [("alpha", 1), ("alpha", 2), ("beta", 1)]
    batch = runs[0]["decoding"]["batch"]
    # the base is generated once, in the same batches as the three adapters
    assert batch["sides"] == ["alpha@1", "alpha@2", "beta@1", "tiny"] and batch["rows"] == 4 * len(PROMPTS)
    assert batch["max_rows_per_forward"] == 4 * 4 and runs[0]["decoding"]["batch_invariant"] is False
    many = {r["adapter_version_id"]: _outputs(catalog, r) for r in runs}
    base = [b for _, b in many[runs[0]["adapter_version_id"]]]
    assert all([b for _, b in outs] == base for outs in many.values())
    assert len({tuple(o for o, _ in outs) for outs in many.values()}) == 3  # three different adapters
    for row, run in zip(three, runs):
        alone = evaluate(catalog, store, f"{row['adapter']}@{row['version']}", data_file, use_cache=False, **kw)
        assert _outputs(catalog, alone) == many[row["id"]]
        assert alone["metrics"]["exact"] == run["metrics"]["exact"]
        assert alone["paired"]["exact"] == run["paired"]["exact"]
        assert alone["metrics"]["perplexity"]["mean"] == pytest.approx(run["metrics"]["perplexity"]["mean"], rel=1e-5)
        assert alone["serving_config"] == run["serving_config"] and alone["serving_config"]["engine"] == "loradex-engine"
        assert alone["decoding"]["batch"]["sides"] == [f"{row['adapter']}@{row['version']}", "tiny"]


def test_outputs_are_what_the_engine_serves(catalog, store, settings, three, data_file):
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    runs = evaluate_many(catalog, store, ["alpha@2", "beta"], data_file, metrics="exact", max_new_tokens=MAX_NEW,
                         batch_size=2, settings=settings, quantize="none")
    items = read_eval_set(data_file).items
    engine = Engine.load(EngineConfig(base="tiny", quantize="none", max_loaded=4), catalog=catalog, store=store,
                         settings=settings)
    try:  # what `loradex serve` answers to chat requests with temperature 0 and max_tokens
        for run, ref in zip(runs, ["alpha@2", "beta"]):
            served = engine.generate_batch([{"messages": it.messages, "adapter": ref, "max_tokens": MAX_NEW,
                                             "temperature": 0} for it in items])
            assert [c.text for c in served] == [o for o, _ in _outputs(catalog, run)]
        served_base = engine.generate_batch([{"messages": it.messages, "max_tokens": MAX_NEW, "temperature": 0}
                                             for it in items])
        assert [c.text for c in served_base] == [b for _, b in _outputs(catalog, runs[0])]
    finally:
        engine.shutdown()


def test_batch_invariant_outputs_do_not_depend_on_batch_size(catalog, store, settings, three, data_file):
    outs = {}
    for bs in (1, 4, 16):
        runs = evaluate_many(catalog, store, ["alpha@1", "beta"], data_file, metrics=("exact", "perplexity"),
                             max_new_tokens=MAX_NEW, batch_size=bs, settings=settings, use_cache=False,
                             batch_invariant=True)
        dec = runs[0]["decoding"]
        assert dec["batch_invariant"] is True and dec["batch_size"] == bs and dec["batch"]["max_rows_per_forward"] == 1
        outs[bs] = [(_outputs(catalog, r), r["metrics"]["perplexity"]["mean"]) for r in runs]
    assert outs[1] == outs[4] == outs[16]


def test_batch_invariant_row_does_not_depend_on_neighbours(catalog, store, settings, three):
    """Engine level: one request alone, then among 15 others of other adapters and lengths: same tokens."""
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    engine = Engine.load(EngineConfig(base="tiny", quantize="none", max_loaded=4, max_batch=16, batch_invariant=True),
                         catalog=catalog, store=store, settings=settings)
    probe = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "adapter": "alpha@1",
             "max_tokens": 12, "temperature": 0}
    try:
        alone = engine.generate_batch([probe])[0].token_ids
        crowd = [{"messages": [{"role": "user", "content": p}], "adapter": a, "max_tokens": 12, "temperature": 0}
                 for p, a in zip(PROMPTS * 2, ["alpha@2", "beta", None] * 8)][:15]
        for at in (0, 7, 15):
            reqs = crowd[:at] + [probe] + crowd[at:]
            assert engine.generate_batch(reqs)[at].token_ids == alone
        assert max(len(s["ids"]) for s in engine.scheduler.recent_steps()) > 1  # the rows did share steps
    finally:
        engine.shutdown()


def test_all_of_aliases_and_base_cache(catalog, store, settings, three, data_file):
    set_alias(catalog, "beta@1", "staging")
    runs = evaluate_many(catalog, store, ["beta@staging", "alpha@2"], data_file, all_of=["alpha"], metrics="exact",
                         max_new_tokens=4, limit=3, settings=settings)
    # alpha@2 named twice (directly and by --all-of alpha): scored once
    assert [f"{r['adapter']}@{r['version']}" for r in runs] == ["beta@1", "alpha@2", "alpha@1"]
    assert all(r["decoding"]["base_cached"] is False for r in runs)
    again = evaluate(catalog, store, "alpha@1", data_file, metrics="exact", max_new_tokens=4, limit=3, settings=settings)
    # a single eval with the same decoding reuses the base outputs the multi-adapter pass cached
    assert again["decoding"]["base_cached"] is True and again["decoding"]["batch"]["sides"] == ["alpha@1"]
    assert _outputs(catalog, again) == _outputs(catalog, runs[2])


def test_bad_input(catalog, store, settings, three, data_file, tiny_base_dir, tmp_path):
    from loradex.hub.bases import add_base

    with pytest.raises(NotFound, match="adapter 'gamma' not found"):
        evaluate_many(catalog, store, [], data_file, all_of=["gamma"], settings=settings)
    with pytest.raises(InvalidConfig, match="at least one adapter"):
        evaluate_many(catalog, store, [], data_file, settings=settings)
    add_base(catalog, store, "tiny2", str(tiny_base_dir))
    other = register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / "o", r=4, seed=5), "other",
                             base="tiny2")
    with pytest.raises(InvalidConfig, match="one eval runs adapters of one base; these are for tiny, tiny2"):
        evaluate_many(catalog, store, ["alpha", f"other@{other['version']}"], data_file, settings=settings)


@pytest.mark.parametrize("argv, code, message", [
    (["eval", "--data", "{data}"], 2, "name an adapter"),
    (["eval", "alpha", "--all-of", "nope", "--data", "{data}"], 3, "adapter 'nope' not found"),
    (["eval", "show"], 2, "eval show RUN"),
])
def test_cli_errors_are_one_line(catalog, three, data_file, capsys, argv, code, message):
    from loradex.cli import main

    catalog.close()
    rc = main([a.replace("{data}", str(data_file)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == code and message in err and err.count("\n") == 0, err


def test_cli_many_json(catalog, three, data_file, capsys):
    from loradex.cli import main

    catalog.close()
    rc = main(["eval", "beta", "--all-of", "alpha", "--data", str(data_file), "--metrics", "exact",
               "--max-new-tokens", "4", "--limit", "2", "--quantize", "none", "--batch-invariant", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [f"{r['adapter']}@{r['version']}" for r in out["runs"]] == ["beta@1", "alpha@1", "alpha@2"]
    assert all(r["gate"]["eval_run_id"] == r["id"] and r["decoding"]["batch_invariant"] for r in out["runs"])
    rc = main(["eval", "alpha@1", "beta", "--data", str(data_file), "--metrics", "exact", "--max-new-tokens", "2",
               "--limit", "1", "--quantize", "none", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "2 adapters scored in one pass (3 rows" in text
    assert "batches: alpha@1, beta@1, tiny (3 rows, up to 24 per forward" in text
