"""Pairwise judges: both orders, position consistency, preference with a CI, stored verdicts, bad judges.

A deterministic judge runs as a real OpenAI-compatible HTTP server on loopback:
model ``longer`` prefers the longer answer wherever it is shown (position-consistent
by construction), model ``always-a`` answers "Verdict: A" whatever it is shown.
The hub path loads the tiny random base as a judge.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loradex.evals import stats
from loradex.evals.judge import (describe, http_judge, judge_items, judge_run, judgement_samples, judgements,
                                 open_judge, parse_verdict, store_judgement, summarize)
from loradex.evals.record import get_samples
from loradex.hub.errors import InvalidConfig, NotFound
from loradex.hub.registry import register_adapter
from tests.helpers import make_adapter, run_cli

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello.", "Give me a fruit.", "Pick a number.", "Greet me."]
SECTION = re.compile(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nWhich answer", re.S)


def longer_rule(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "longer"}, {"id": "always-a"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        a, b = SECTION.search(body["messages"][-1]["content"]).groups()
        verdict = "A" if body["model"] == "always-a" else longer_rule(a, b)
        self._send(200, {"choices": [{"message": {"role": "assistant",
                                                  "content": f"Compared by length.\nVerdict: {verdict}"}}]})


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": f"answer {i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture
def tiny_adapter(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    folder = make_adapter(tiny_base_dir, tmp_path / "ad", r=4, alpha=8, scale=0.5, seed=1)
    return register_adapter(catalog, store, folder, "tiny-ad", base="tiny")


def test_parse_verdict():
    assert parse_verdict("A is fluent but wrong.\nVerdict: B") == "B"
    assert parse_verdict('Format: "Verdict: A"... my call. Verdict: **tie**') == "tie"
    assert parse_verdict("A.") == "A" and parse_verdict("Answer B") == "B"
    assert parse_verdict('The answer "A" is the better choice.') == "A"
    assert parse_verdict("The answer that is better is answer B.") == "B"
    assert parse_verdict("Answer A is better here, but answer B is better there.") is None
    assert parse_verdict("a cat sat") is None and parse_verdict("") is None and parse_verdict("both fine") is None


SYNTH = [{"idx": i, "prompt": f"q{i}", "reference": "r", "output": "x" * (i + 1), "base_output": "yyy"} for i in range(6)]


def test_always_a_is_position_biased_and_consistent_judge_is_not():
    items = judge_items(lambda chats: ["Verdict: A"] * len(chats), SYNTH)
    s = summarize(items)
    assert s["consistency_rate"] == 0.0 and s["consistent"] == 0 and s["n_parsed"] == 6
    assert s["position_biased"] and s["biased_toward"] == "A" and s["same_slot"] == {"A": 6, "B": 0}
    assert s["preference_rate"] == 0.5 and s["ties"] == 6  # flips with the order: every item a tie
    assert "POSITION-BIASED" in describe(s, "j")

    def fair(chats):
        return [f"Verdict: {longer_rule(*SECTION.search(c[-1]['content']).groups())}" for c in chats]

    items = judge_items(fair, SYNTH)
    s = summarize(items)
    # adapter output lengths 1..6 vs base 3: losses at 1, 2; tie at 3; wins at 4, 5, 6
    assert [it["score"] for it in items] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    assert s["consistency_rate"] == 1.0 and not s["position_biased"]
    assert (s["wins"], s["ties"], s["losses"]) == (3, 1, 2) and s["preference_rate"] == pytest.approx(3.5 / 6)
    expected = stats.summarize([0.0, 0.0, 0.5, 1.0, 1.0, 1.0], binary=False, seed=0)
    assert (s["ci_low"], s["ci_high"], s["method"]) == (expected["ci_low"], expected["ci_high"], expected["method"])
    unparsed = summarize(judge_items(lambda chats: ["no idea"] * len(chats), SYNTH))
    assert unparsed["n_unparsed"] == 6 and unparsed["preference_rate"] is None and "no usable verdict" in describe(unparsed, "j")


def test_http_judge_through_the_cli_both_orders_stored(catalog, tiny_adapter, data_file, judge_server):
    server, url = judge_server
    catalog.close()
    r = run_cli("eval", "tiny-ad", "--data", str(data_file), "--metrics", "exact", "--max-new-tokens", "6",
                "--quantize", "none", "--no-progress", "--judge", url, "--judge-model", "longer", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    j = out["judgement"]
    assert j["judge"] == url and j["judge_kind"] == "url" and j["judge_model"] == "longer" and j["n"] == len(PROMPTS)
    assert len(server.seen) == 2 * len(PROMPTS) and all(b["temperature"] == 0 for b in server.seen)

    from loradex.hub.catalog import Catalog
    from loradex.hub.settings import Settings

    with Catalog.open(Settings().catalog_path) as cat:
        samples = get_samples(cat, out["id"])
        stored = judgement_samples(cat, j["id"])
        assert [x["id"] for x in judgements(cat, out["id"])] == [j["id"]]
        # the same stored outputs, judged by a judge that always says A
        biased, _ = judge_run(http_judge(url, "always-a"), out, samples)
    expected = []
    for s, v in zip(samples, stored):
        want = longer_rule(s["output"], s["base_output"])
        winner = {"A": "adapter", "B": "base", "tie": "tie"}[want]
        assert (v["idx"], v["winner_ab"], v["winner_ba"], v["consistent"]) == (s["idx"], winner, winner, True)
        assert v["raw_ab"].endswith(f"Verdict: {want}") and "Compared by length" in v["raw_ba"]
        expected.append({"adapter": 1.0, "tie": 0.5, "base": 0.0}[winner])
    summary = j["summary"]
    assert summary["consistency_rate"] == 1.0 and not summary["position_biased"]
    assert summary["preference_rate"] == pytest.approx(sum(expected) / len(expected))
    ci = stats.summarize(expected, binary=all(e in (0.0, 1.0) for e in expected), seed=0)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((ci["ci_low"], ci["ci_high"]))
    assert biased["consistency_rate"] == 0.0 and biased["position_biased"] and biased["biased_toward"] == "A"

    r = run_cli("eval", "show", str(out["id"]))
    assert r.returncode == 0, r.stderr
    assert f"judge {url}: adapter preferred" in r.stdout and "position-consistent on 6/6 (100%)" in r.stdout
    assert "adapter-first" in r.stdout and "Compared by length" in r.stdout
    r = run_cli("show", "tiny-ad")
    assert r.returncode == 0, r.stderr
    assert f"judge {url}" in r.stdout and "position-consistent on 6/6" in r.stdout
    r = run_cli("leaderboard")  # beside the task scores: a line per version
    assert r.returncode == 0, r.stderr
    assert "tiny-ad@1" in r.stdout.split("human reviews and judges")[1] and f"judge {url}: adapter preferred" in r.stdout


def test_bad_judges_are_one_line_errors(catalog, tiny_adapter, data_file):
    catalog.close()
    for judge, message in [("http://127.0.0.1:9/v1", "cannot reach the judge at http://127.0.0.1:9/v1/models"),
                           ("ftp://x/v1", "only http:// and https:// URLs"),
                           ("no-such-judge", "neither a base nor an adapter of this hub")]:
        r = run_cli("eval", "tiny-ad", "--data", str(data_file), "--quantize", "none", "--judge", judge)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and message in r.stderr, (judge, r.stderr)
        assert r.stdout == ""
    r = run_cli("eval", "tiny-ad", "--data", str(data_file), "--metrics", "perplexity", "--judge", "tiny")
    assert r.returncode != 0 and "--judge compares generated answers" in r.stderr and r.stderr.count("\n") == 1


def test_hub_base_as_judge_stores_raw_answers(catalog, store, settings, tiny_adapter, data_file):
    from loradex.evals import evaluate

    run = evaluate(catalog, store, "tiny-ad", data_file, metrics=("exact",), max_new_tokens=4, settings=settings,
                   quantize="none")
    judge = open_judge("tiny", max_tokens=6, catalog=catalog, store=store, settings=settings)
    assert judge.kind == "hub" and judge.model == "tiny"
    summary, items = judge_run(judge, run, get_samples(catalog, run["id"]))
    assert len(items) == len(PROMPTS) and all(isinstance(it["raw_ab"], str) and isinstance(it["raw_ba"], str)
                                               for it in items)
    assert summary["n_parsed"] + summary["n_unparsed"] == len(PROMPTS)
    row = store_judgement(catalog, run["id"], judge.spec, judge.kind, judge.model, summary, items, judge.settings)
    assert [s["raw_ab"] for s in judgement_samples(catalog, row["id"])] == [it["raw_ab"] for it in items]
    with pytest.raises(InvalidConfig, match="--judge-model names the model of a judge URL"):
        open_judge("tiny", model="x", catalog=catalog, store=store, settings=settings)
    with pytest.raises(NotFound, match="neither a base nor an adapter"):
        open_judge("nope@3", catalog=catalog, store=store, settings=settings)
