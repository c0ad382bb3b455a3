"""Metric and interval arithmetic against hand-computed values."""
from __future__ import annotations

import math

import pytest

from loradex.evals import stats
from loradex.evals.metrics import exact_scores, normalise, parse_metrics, primary_metric
from loradex.hub.errors import InvalidConfig


def test_normalise_and_exact_match():
    assert normalise("  Hello,   WORLD!! ") == "hello world"
    assert normalise("It's\tfine.\n") == "its fine"
    assert normalise("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    assert exact_scores(["Paris.", "paris!", "Lyon", "  PARIS  "], ["Paris", "Paris", "Paris", "paris"]) == [1, 1, 0, 1]
    assert exact_scores(["the cat"], ["thecat"]) == [0.0]  # whitespace between words still counts


def test_wilson_matches_hand_computation():
    # 8 of 10, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.71686,
    # half = 1.96 * sqrt(0.016 + 0.0096040) / 1.38416 = 0.22661  -> [0.4902, 0.9433]
    lo, hi = stats.wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert stats.wilson_ci(0, 5)[0] == 0.0 and stats.wilson_ci(5, 5)[1] == 1.0
    assert stats.wilson_ci(0, 5)[1] == pytest.approx(1.96 ** 2 / (5 + 1.96 ** 2), abs=1e-3)


def test_summarize_mean_std_and_method():
    s = stats.summarize([0.2, 0.4, 0.6, 0.8])
    assert s["mean"] == pytest.approx(0.5) and s["n"] == 4
    assert s["std"] == pytest.approx(math.sqrt(((0.3 ** 2) * 2 + (0.1 ** 2) * 2) / 3))
    assert s["method"].startswith("bootstrap") and 0.2 <= s["ci_low"] < 0.5 < s["ci_high"] <= 0.8
    assert stats.summarize([1, 0, 1, 1])["method"] == "wilson"
    assert stats.summarize([1, 0, 1, 1])["mean"] == 0.75
    # a constant sample has a zero-width interval
    c = stats.summarize([0.3] * 5)
    assert c["ci_low"] == c["ci_high"] == pytest.approx(0.3)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    vals = [0.13, 0.91, 0.42, 0.77, 0.35, 0.58, 0.86, 0.21, 0.64, 0.49, 0.05, 0.97]
    assert stats.bootstrap_ci(vals, seed=3) == stats.bootstrap_ci(vals, seed=3)
    assert stats.bootstrap_ci(vals, seed=3) != stats.bootstrap_ci(vals, seed=4)
    lo, hi = stats.bootstrap_ci(vals)
    assert lo < sum(vals) / len(vals) < hi


@pytest.mark.parametrize("binary", [False, True])
def test_ci_width_shrinks_with_n(binary):
    import numpy as np

    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 40, 160, 640):
        vals = (rng.random(n) < 0.6).astype(float) if binary else rng.normal(0.5, 0.2, n)
        s = stats.summarize(list(vals), binary=binary)
        widths.append(s["ci_high"] - s["ci_low"])
    assert widths == sorted(widths, reverse=True)
    # roughly 1/sqrt(n): 64x the items, about 1/8 the width
    assert widths[-1] / widths[0] == pytest.approx(1 / 8, rel=0.5)


def test_paired_difference_sign_on_constructed_cases():
    base = [0.2, 0.3, 0.4, 0.5, 0.6, 0.2, 0.3, 0.4]
    better = [b + 0.1 + 0.01 * i for i, b in enumerate(base)]
    up = stats.paired_difference(better, base)
    assert up["diff"] == pytest.approx(0.1 + 0.01 * 3.5) and up["ci_low"] > 0
    down = stats.paired_difference(base, better)
    assert down["diff"] == pytest.approx(-up["diff"]) and down["ci_high"] < 0
    same = stats.paired_difference(base, base)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0
    # pairing matters: a constant shift is certain even though the two means' own CIs overlap
    assert stats.summarize(better)["ci_low"] < stats.summarize(base)["ci_high"]
    with pytest.raises(ValueError):
        stats.paired_difference([1, 2], [1])


def test_win_rate_counts_and_direction():
    w = stats.win_rate([0.9, 0.5, 0.1, 0.7], [0.1, 0.5, 0.2, 0.6])
    assert (w["wins"], w["ties"], w["losses"]) == (2, 1, 1) and w["rate"] == 0.5
    lo, hi = stats.wilson_ci(2, 4)
    assert (w["ci_low"], w["ci_high"]) == (lo, hi)
    ppl = stats.win_rate([2.0, 9.0], [3.0, 4.0], higher_is_better=False)  # lower perplexity wins
    assert (ppl["wins"], ppl["losses"]) == (1, 1)


def test_parse_metrics_and_primary():
    assert parse_metrics("similarity, exact,similarity") == ("similarity", "exact")
    assert primary_metric(("perplexity", "exact")) == "exact"
    assert primary_metric(("perplexity",)) == "perplexity"
    with pytest.raises(InvalidConfig, match="unknown metric"):
        parse_metrics("bleu")
    with pytest.raises(InvalidConfig, match="--metrics"):
        parse_metrics("")


def test_similarity_with_the_packaged_minilm():
    from loradex.evals.metrics import load_similarity_model, similarity_scores

    model = load_similarity_model()
    same, close, far = similarity_scores(
        model, ["The capital of France is Paris.", "Paris is France's capital.", "I like green bicycles."],
        ["The capital of France is Paris.", "The capital of France is Paris.", "The capital of France is Paris."])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert close > 0.8 > 0.3 > far


def test_perplexity_matches_a_hand_computed_nll(tiny_base_dir):
    """Batched, right-padded teacher forcing equals the NLL summed by hand one item at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradex.evals.data import EvalItem
    from loradex.evals.generate import reference_perplexities
    from loradex.hub.chat import encode_chat

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    items = [EvalItem(({"role": "user", "content": "Hi"},), "Hello there, friend.", 1),
             EvalItem(({"role": "user", "content": "A much longer question about many things?"},), "Yes.", 2)]
    got = reference_perplexities(model, tok, items, batch_size=2)
    for item, ppl in zip(items, got):
        p = encode_chat(tok, item.messages)
        ref = tok(item.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + ref])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        nll = -sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(ref)) / len(ref)
        assert ppl == pytest.approx(math.exp(nll), rel=1e-4)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradex.evals.data import EvalItem
    from loradex.evals.generate import generate_outputs

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # sharpen the random model so it emits ordinary tokens, not only end-of-turn
        for p in model.parameters():
            p.normal_(0, 0.3)
    items = [EvalItem(({"role": "user", "content": q},), "x", i)
             for i, q in enumerate(["Hi", "Tell me a long story about a dragon and a knight", "Why?"])]
    batched = generate_outputs(model, tok, items, max_new_tokens=8, batch_size=3)
    single = [generate_outputs(model, tok, [it], max_new_tokens=8, batch_size=1)[0] for it in items]
    assert batched == single
    assert any(batched)
