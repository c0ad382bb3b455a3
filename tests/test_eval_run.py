"""evaluate() end to end on the tiny random Llama: stored run, samples, base cache, CLI views."""
from __future__ import annotations

import json

import pytest

from loradex.evals import evaluate
from loradex.evals.record import get_samples
from loradex.hub.errors import InvalidConfig, InvalidData, NotFound
from loradex.hub.registry import register_adapter
from tests.helpers import make_adapter, run_cli

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello.", "Give me a fruit.", "Pick a number.", "Greet me."]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = []
    for i, p in enumerate(PROMPTS):
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"answer {i}"}]})
        else:
            rows.append({"prompt": p, "completion": f"answer {i}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def tiny_adapter(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    folder = make_adapter(tiny_base_dir, tmp_path / "ad", r=4, alpha=8, scale=0.5, seed=1)
    return register_adapter(catalog, store, folder, "tiny-ad", base="tiny")


def test_evaluate_stores_run_samples_and_caches_base(catalog, store, settings, tiny_adapter, data_file):
    run = evaluate(catalog, store, "tiny-ad", data_file, metrics=("similarity", "exact", "perplexity"),
                   max_new_tokens=6, batch_size=4, settings=settings)
    assert run["id"] and run["n"] == len(PROMPTS) and run["adapter"] == "tiny-ad"
    for m in ("similarity", "exact", "perplexity"):
        s = run["metrics"][m]
        assert s["n"] == len(PROMPTS) and s["ci_low"] <= s["mean"] <= s["ci_high"]
        assert run["paired"][m]["ci_low"] <= run["paired"][m]["diff"] <= run["paired"][m]["ci_high"]
    assert run["metrics"]["exact"]["method"] == "wilson"
    assert run["metrics"]["similarity"]["method"].startswith("bootstrap")
    dec = run["decoding"]
    assert dec["do_sample"] is False and dec["max_new_tokens"] == 6 and dec["engine"] == "loradex-engine"
    assert dec["base_cached"] is False and dec["eval_config"]["metrics"] == ["similarity", "exact", "perplexity"]
    assert "all-MiniLM-L6-v2" in run["metric_model"]
    samples = get_samples(catalog, run["id"])
    assert [s["idx"] for s in samples] == list(range(len(PROMPTS)))
    assert samples[1]["prompt"] == PROMPTS[1] and samples[1]["reference"] == "answer 1"
    # the random adapter changes the tiny model's text: outputs differ from the base somewhere
    assert any(s["output"] != s["base_output"] for s in samples)
    # paired diff is the mean of the stored per-item differences
    diffs = [s["scores"]["similarity"] - s["base_scores"]["similarity"] for s in samples]
    assert run["paired"]["similarity"]["diff"] == pytest.approx(sum(diffs) / len(diffs))

    again = evaluate(catalog, store, "tiny-ad@1", data_file, metrics=("similarity", "exact", "perplexity"),
                     max_new_tokens=6, batch_size=4, settings=settings)
    assert again["decoding"]["base_cached"] is True
    assert again["base_metrics"] == run["base_metrics"]
    assert [s["base_output"] for s in get_samples(catalog, again["id"])] == [s["base_output"] for s in samples]
    assert [s["output"] for s in get_samples(catalog, again["id"])] == [s["output"] for s in samples]


def test_evaluate_with_short_lived_catalogs(catalog, store, settings, tiny_adapter, data_file):
    catalog.close()  # evaluate(None, ...) opens and closes its own around the model work
    run = evaluate(None, store, "tiny-ad", data_file, metrics="exact", max_new_tokens=4, limit=3, settings=settings)
    assert run["n"] == 3 and run["metrics"]["exact"]["n"] == 3


def test_evaluate_rejects_bad_input(catalog, store, settings, tiny_adapter, data_file, tmp_path):
    with pytest.raises(InvalidConfig, match="--metrics"):
        evaluate(catalog, store, "tiny-ad", data_file, metrics=("bleu",), settings=settings)
    with pytest.raises(InvalidConfig, match="--max-new-tokens"):
        evaluate(catalog, store, "tiny-ad", data_file, max_new_tokens=0, settings=settings)
    with pytest.raises(NotFound):
        evaluate(catalog, store, "nope", data_file, settings=settings)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"messages": []}\n')
    with pytest.raises(InvalidData, match=r"bad.jsonl:2"):
        evaluate(catalog, store, "tiny-ad", bad, settings=settings)


def test_cli_eval_show_and_leaderboard(catalog, store, tiny_adapter, data_file, tmp_path):
    catalog.close()
    r = run_cli("eval", "tiny-ad", "--data", str(data_file), "--metrics", "similarity,exact", "--max-new-tokens", "5",
                "--json")
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    assert run["metrics"]["similarity"]["n"] == len(PROMPTS)
    assert run["gate"]["ok"] in (True, False) and run["gate"]["eval_run_id"] == run["id"]

    r = run_cli("eval", "show", str(run["id"]), "--worst", "2")
    assert r.returncode == 0, r.stderr
    assert "2 worst items by similarity" in r.stdout and "reference:" in r.stdout
    r = run_cli("eval", "show", str(run["id"]), "--worst", "2", "--json")
    shown = json.loads(r.stdout)["samples"]
    scores = sorted(s["scores"]["similarity"] for s in json.loads(run_cli("eval", "show", str(run["id"]), "--json").stdout)["samples"])
    assert [s["scores"]["similarity"] for s in shown] == scores[:2]

    png = tmp_path / "board.png"
    r = run_cli("leaderboard", "--data", str(data_file), "--png", str(png), "--json")
    assert r.returncode == 0, r.stderr
    board = json.loads(r.stdout)
    assert board["sections"][0]["rows"][0]["ref"] == "tiny-ad@1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



@pytest.mark.parametrize("argv, code, message", [
    (["eval", "show", "999"], 3, "eval run 999 not found"),
    (["eval", "show", "x1"], 2, "RUN must be an eval run id"),
    (["eval", "tiny-ad"], 2, "--data FILE is required"),
    (["eval", "tiny-ad", "--data", "{data}", "--metrics", "bleu"], 2, "unknown metric(s) bleu"),
    (["eval", "tiny-ad", "--data", "{data}", "--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1"),
    (["eval", "nope", "--data", "{data}"], 3, "adapter 'nope' not found"),
    (["leaderboard", "--data", "zz"], 2, "no such file, and not a data sha256"),
])
def test_cli_errors_are_one_line(catalog, tiny_adapter, data_file, capsys, argv, code, message):
    from loradex.cli import main

    catalog.close()
    argv = [a.replace("{data}", str(data_file)) for a in argv]
    try:
        rc = main(argv)
        usage = False
    except SystemExit as exc:  # argparse rejects bad flag values itself: usage, then the error line
        rc, usage = exc.code, True
    err = capsys.readouterr().err.strip()
    assert rc == code and message in err.splitlines()[-1], err
    assert usage or err.count("\n") == 0
