"""Pairwise judging of an eval run: adapter vs base, each item asked in both orders.

    loradex eval NAME[@V] --data held_out.jsonl --judge MODEL [--judge-model ID] [--judge-max-tokens 96]

``MODEL`` is a base or adapter in the hub (``smollm2-135m-instruct``, ``critic@2``;
loaded locally, greedy) or an OpenAI-compatible endpoint (``http://host:port/v1``;
``/chat/completions`` at temperature 0, key from ``LORADEX_JUDGE_API_KEY`` if set).

Top to bottom, after ``evaluate()`` stored the run and its samples::

    samples (prompt, reference, adapter output, base output)
      -> two prompts per item:  order "ab": adapter = A, base = B
                                order "ba": base = A, adapter = B
      -> the judge answers each (rationale, then a line "Verdict: A|B|tie")
      -> parse_verdict -> winner per order (adapter | base | tie | None)
      -> per item: consistent = both parsed and the same winner in both orders;
         score = mean of the two orders' (1 adapter, 0.5 tie, 0 base);
         a judge that flips with the order scores the item a tie
      -> summary: preference rate with a 95% CI (evals.stats: Wilson when every
         item is 0/1, bootstrap otherwise), position-consistency rate with its
         Wilson CI, and "position-biased" when more than half the parsed items got
         the same slot (A or B) in both orders
      -> catalog: judge_runs (summary) + judge_samples (verdicts, raw answers)

A judge is any callable ``complete(list_of_chats) -> list_of_texts`` (a plain
function: tests plug in their own); :func:`open_judge` builds one from what the
user typed.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.errors import InvalidConfig, InvalidData, LoradexError, NotFound
from loradex.hub.ops import op

from loradex.evals import stats

PROMPT_VERSION = "pairwise-v1"
API_KEY_ENV = "LORADEX_JUDGE_API_KEY"
HTTP_TIMEOUT_S = 120.0

SYSTEM = ("You are an impartial judge. You compare two answers to the same user request and decide which one "
          "is better: more correct, more helpful, closer to the reference answer when one is given. "
          "Ignore the order in which the answers are shown and their length as such.")
INSTRUCTION = ("Which answer is better? Give a one-sentence reason, then end with exactly one line: "
               "\"Verdict: A\", \"Verdict: B\" or \"Verdict: tie\".")

Complete = Callable[[list[list[dict]]], list[str]]


@dataclass
class Judge:
    """A judge ready to answer: ``complete`` plus what to record about it."""

    complete: Complete
    spec: str
    """What the user typed (--judge)."""
    kind: str
    """hub | url | custom"""
    model: str | None
    """The resolved model: NAME@V, a base name, or the endpoint's model id."""
    settings: dict


# -- prompt and verdict ------------------------------------------------------------------

def build_prompt(prompt: str, reference: str | None, answer_a: str, answer_b: str) -> list[dict]:
    """The chat a judge sees for one item in one order."""
    parts = [f"[User request]\n{prompt}"]
    if reference:
        parts.append(f"[Reference answer]\n{reference}")
    parts += [f"[Answer A]\n{answer_a}", f"[Answer B]\n{answer_b}", INSTRUCTION]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


_VERDICT_LINE = re.compile(r"verdict\W{0,4}(?:is\W{0,3})?(A|B|tie)\b", re.IGNORECASE)
# plain sentences small judges write instead of the verdict line: 'answer "A" is the better', 'the better is answer B'
_SENTENCE = re.compile(r"\b(?:[Aa]nswer|[Rr]esponse)\s*\W?(A|B)\W?\s+is\s+(?:the\s+)?better"
                       r"|\bbetter(?:\s+one)?\s+is\s+(?:[Aa]nswer\s+|[Rr]esponse\s+)?\W?(A|B)\b")
_BARE = re.compile(r"^\W*(?:[Aa]nswer\s+)?(A|B|[Tt]ie)\W*$")


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from a judge's answer; None when it names none.

    The last ``Verdict: X`` wins (a rationale may quote the format first); an answer
    that is only ``A``/``B``/``tie`` (``"A."``, ``"Answer B"``) counts too, and so does one
    plain sentence naming the better answer (``The answer "A" is the better choice``)
    when there is no verdict line.
    """
    if not text:
        return None
    found = _VERDICT_LINE.findall(text)
    raw = found[-1] if found else None
    if raw is None:
        m = _BARE.match(text.strip())
        if m:
            raw = m.group(1)
    if raw is None:
        named = {a or b for a, b in _SENTENCE.findall(text)}
        if len(named) == 1:  # a text that calls both answers better names neither
            raw = named.pop()
    if raw is None:
        return None
    return "tie" if raw.lower() == "tie" else raw.upper()


def _winner(verdict: str | None, adapter_is_a: bool) -> str | None:
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    return "adapter" if (verdict == "A") == adapter_is_a else "base"


POINTS = {"adapter": 1.0, "tie": 0.5, "base": 0.0}


# -- judging and aggregation ----------------------------------------------------------------

def judge_items(complete: Complete, samples: list[dict]) -> list[dict]:
    """Ask the judge about every sample in both orders; one record per sample (see module docstring).

    ``samples``: eval_samples rows (``idx``, ``prompt``, ``reference``, ``output``, ``base_output``).
    """
    chats = []
    for s in samples:
        chats.append(build_prompt(s["prompt"], s.get("reference"), s["output"], s["base_output"]))  # adapter = A
        chats.append(build_prompt(s["prompt"], s.get("reference"), s["base_output"], s["output"]))  # adapter = B
    answers = complete(chats)
    if len(answers) != len(chats):
        raise RuntimeError(f"the judge answered {len(answers)} prompts, expected {len(chats)}")
    items = []
    for i, s in enumerate(samples):
        raw_ab, raw_ba = answers[2 * i], answers[2 * i + 1]
        v_ab, v_ba = parse_verdict(raw_ab), parse_verdict(raw_ba)
        w_ab, w_ba = _winner(v_ab, True), _winner(v_ba, False)
        parsed = w_ab is not None and w_ba is not None
        items.append({
            "idx": s["idx"], "verdict_ab": v_ab, "verdict_ba": v_ba, "winner_ab": w_ab, "winner_ba": w_ba,
            "consistent": parsed and w_ab == w_ba,
            "score": (POINTS[w_ab] + POINTS[w_ba]) / 2 if parsed else None,
            "raw_ab": raw_ab, "raw_ba": raw_ba,
        })
    return items


def summarize(items: list[dict], seed: int = 0) -> dict:
    """Preference rate (CI), position consistency (CI), position bias and counts of judged items."""
    n = len(items)
    parsed = [it for it in items if it["score"] is not None]
    scores = [it["score"] for it in parsed]
    consistent = sum(1 for it in parsed if it["consistent"])
    same_a = sum(1 for it in parsed if it["verdict_ab"] == it["verdict_ba"] == "A")
    same_b = sum(1 for it in parsed if it["verdict_ab"] == it["verdict_ba"] == "B")
    out = {
        "n": n, "n_parsed": len(parsed), "n_unparsed": n - len(parsed),
        "wins": sum(1 for s in scores if s == 1.0), "losses": sum(1 for s in scores if s == 0.0),
        "ties": sum(1 for s in scores if 0.0 < s < 1.0),
        "consistent": consistent, "same_slot": {"A": same_a, "B": same_b},
        "consistency_rate": None, "consistency_ci_low": None, "consistency_ci_high": None,
        "preference_rate": None, "ci_low": None, "ci_high": None, "method": None,
        "position_biased": False, "biased_toward": None,
    }
    if parsed:
        lo, hi = stats.wilson_ci(consistent, len(parsed))
        out.update(consistency_rate=consistent / len(parsed), consistency_ci_low=lo, consistency_ci_high=hi)
        pref = stats.summarize(scores, binary=all(s in (0.0, 1.0) for s in scores), seed=seed)
        out.update(preference_rate=pref["mean"], ci_low=pref["ci_low"], ci_high=pref["ci_high"], method=pref["method"])
        if same_a + same_b > len(parsed) / 2:
            out.update(position_biased=True, biased_toward="A" if same_a >= same_b else "B")
    return out


def describe(summary: dict, judge: str) -> str:
    """One or two lines for `eval`, `eval show` and `show`."""
    s = summary
    head = f"judge {judge}: "
    if not s["n_parsed"]:
        return head + f"no usable verdict on any of {s['n']} items (the judge never answered A, B or tie)"
    text = (head + f"adapter preferred {s['preference_rate']:.0%} [95% CI {s['ci_low']:.0%}, {s['ci_high']:.0%}] "
            f"({s['wins']} wins, {s['ties']} ties, {s['losses']} losses; n={s['n_parsed']}"
            + (f", {s['n_unparsed']} unparsed" if s["n_unparsed"] else "") + "); "
            f"position-consistent on {s['consistent']}/{s['n_parsed']} ({s['consistency_rate']:.0%})")
    if s["position_biased"]:
        k = s["same_slot"][s["biased_toward"]]
        text += (f"\n    POSITION-BIASED: picked slot {s['biased_toward']} in both orders on {k}/{s['n_parsed']} items; "
                 f"its preference says little")
    return text


# -- judges ---------------------------------------------------------------------------------

def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _http_json(url: str, body: dict | None, key: str | None, timeout: float, spec: str) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200].replace("\n", " ")
        raise InvalidConfig(f"--judge {spec}: {url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InvalidConfig(f"--judge {spec}: cannot reach the judge at {url} ({reason})") from None
    except ValueError:
        raise InvalidConfig(f"--judge {spec}: {url} did not answer JSON (is it an OpenAI-compatible /v1 URL?)") from None


def http_judge(url: str, model: str | None = None, *, max_tokens: int = 96, api_key: str | None = None,
               timeout: float = HTTP_TIMEOUT_S) -> Judge:
    """An OpenAI-compatible endpoint as a judge; checks it answers (``GET /models``) before anything runs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidConfig(f"--judge {url}: not a URL (expected http://host:port/v1)")
    base = url.rstrip("/")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if model is None:
        listed = _http_json(f"{base}/models", None, key, timeout, url)
        ids = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict) and m.get("id")]
        if not ids:
            raise InvalidConfig(f"--judge {url}: {base}/models lists no model; name one with --judge-model")
        model = ids[0]

    def complete(chats: list[list[dict]]) -> list[str]:
        out = []
        for chat in chats:
            body = {"model": model, "messages": chat, "temperature": 0, "max_tokens": max_tokens}
            answer = _http_json(f"{base}/chat/completions", body, key, timeout, url)
            try:
                out.append(answer["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                raise InvalidConfig(f"--judge {url}: the answer is not a chat completion: {str(answer)[:200]}") from None
        return out

    return Judge(complete, url, "url", model, {"max_tokens": max_tokens, "temperature": 0})


def _hub_target(catalog, spec: str) -> dict | None:
    """None when ``spec`` names a registered base, else the adapter version it resolves to (NotFound otherwise)."""
    from loradex.hub.bases import DEFAULT_BASE, list_bases
    from loradex.hub.registry import resolve

    if spec == DEFAULT_BASE or spec in {b["name"] for b in list_bases(catalog)}:
        return None  # the default base is provisioned on first load
    try:
        return resolve(catalog, spec)
    except LoradexError as exc:
        raise NotFound(f"--judge {spec}: neither a base nor an adapter of this hub ({exc}); "
                       f"or give an OpenAI-compatible URL (http://host:port/v1)") from None


def hub_judge(spec: str, *, catalog=None, store=None, settings=None, max_tokens: int = 96,
              device: str = "auto", batch_size: int = 8) -> Judge:
    """A base or adapter of this hub as a judge, loaded here (full precision), greedy."""
    from loradex.hub.catalog import borrowed
    from loradex.hub.loading import load_base
    from loradex.hub.registry import adapter_folder
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store

    settings = settings or Settings()
    store = store or Store(settings.store)
    with borrowed(catalog, settings) as cat:
        version = _hub_target(cat, spec)
        if version is None:
            base, folder, model_name = spec, None, spec
        else:
            version, folder = adapter_folder(cat, store, version)
            base, model_name = version["base"], f"{version['adapter']}@{version['version']}"
    loaded = load_base(base, "none", device, catalog=catalog, store=store, settings=settings)
    model = loaded.model
    if folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        model.eval()
    from loradex.evals.generate import generate_outputs

    @dataclass(frozen=True)
    class _Chat:
        messages: tuple

    def complete(chats: list[list[dict]]) -> list[str]:
        return generate_outputs(model, loaded.tokenizer, [_Chat(tuple(c)) for c in chats],
                                max_new_tokens=max_tokens, batch_size=batch_size)

    return Judge(complete, spec, "hub", model_name, {"max_tokens": max_tokens, "decoding": "greedy", "quantize": "none"})


def open_judge(spec: str, *, model: str | None = None, max_tokens: int = 96, catalog=None, store=None,
               settings=None, device: str = "auto") -> Judge:
    """``--judge`` as typed: a URL (checked now) or a hub ref (resolved and loaded now)."""
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise InvalidConfig(f"--judge-max-tokens must be an integer in 1..4096, got {max_tokens!r}")
    if is_url(spec):
        return http_judge(spec, model, max_tokens=max_tokens)
    if model is not None:
        raise InvalidConfig("--judge-model names the model of a judge URL; a hub judge is named by --judge itself")
    return hub_judge(spec, catalog=catalog, store=store, settings=settings, max_tokens=max_tokens, device=device)


def check_spec(spec: str, catalog=None) -> None:
    """Fail before any generation on a --judge that is neither a URL nor (given ``catalog``) a hub base or ref."""
    if not spec or not spec.strip():
        raise InvalidConfig("--judge needs a hub base/adapter ref or an OpenAI-compatible URL")
    if "://" in spec and not is_url(spec):
        raise InvalidConfig(f"--judge {spec}: only http:// and https:// URLs are supported")
    if catalog is not None and not is_url(spec):
        _hub_target(catalog, spec)


def judge_run(judge: Judge, run: dict, samples: list[dict], *, seed: int = 0) -> tuple[dict, list[dict]]:
    """Judge an eval run's samples; return (summary, per-item records) without storing them."""
    usable = [s for s in samples if s.get("output") is not None and s.get("base_output") is not None]
    if not usable:
        raise InvalidConfig(f"eval run {run['id']} has no generated outputs to judge "
                            f"(use --metrics similarity or exact)")
    items = judge_items(judge.complete, usable)
    return summarize(items, seed=seed), items


# -- catalog --------------------------------------------------------------------------------

@op("judges.store", write=True)
def store_judgement(catalog: Catalog, eval_run_id: int, judge: str, judge_kind: str, judge_model: str | None,
                    summary: dict, items: list[dict], settings: dict | None = None,
                    duration_s: float | None = None) -> dict:
    """Store a judgement of an eval run (summary + every item's verdicts and raw answers); return it."""
    if catalog.one("SELECT id FROM eval_runs WHERE id = ?", [eval_run_id]) is None:
        raise NotFound(f"eval run {eval_run_id} not found")
    if judge_kind not in ("hub", "url", "custom"):
        raise InvalidData(f"judge_kind must be hub, url or custom, got {judge_kind!r}")
    fields = ("idx", "verdict_ab", "verdict_ba", "winner_ab", "winner_ba", "consistent", "score", "raw_ab", "raw_ba")
    if not isinstance(summary.get("n"), int) or summary["n"] != len(items):
        raise InvalidData(f"a judgement's summary must count its items (n={summary.get('n')!r}, {len(items)} items)")
    bad = [i for i, it in enumerate(items) if not isinstance(it, dict) or any(f not in it for f in fields)]
    if bad:
        raise InvalidData(f"judged item {bad[0]} lacks one of {', '.join(fields)}")
    with catalog.transaction() as cur:
        jid = cur.execute(
            "INSERT INTO judge_runs (eval_run_id, judge, judge_kind, judge_model, prompt_version, n, summary, settings, "
            "duration_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [eval_run_id, judge, judge_kind, judge_model, PROMPT_VERSION, summary["n"], to_json(summary),
             to_json(settings or {}), duration_s, utcnow()]).fetchone()[0]
        cur.executemany(
            "INSERT INTO judge_samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [[jid, it["idx"], it["verdict_ab"], it["verdict_ba"], it["winner_ab"], it["winner_ba"], it["consistent"],
              it["score"], it["raw_ab"], it["raw_ba"]] for it in items])
    return catalog.one("SELECT * FROM judge_runs WHERE id = ?", [jid])


@op("judges.for_run")
def judgements(catalog: Catalog, eval_run_id: int) -> list[dict]:
    """Judgements of one eval run, oldest first."""
    return catalog.query("SELECT * FROM judge_runs WHERE eval_run_id = ? ORDER BY id", [eval_run_id])


@op("judges.samples")
def judgement_samples(catalog: Catalog, judge_run_id: int) -> list[dict]:
    """One judgement's per-item verdicts and raw answers."""
    return catalog.query("SELECT * FROM judge_samples WHERE judge_run_id = ? ORDER BY idx", [judge_run_id])


@op("judges.latest")
def latest_judgements(catalog: Catalog) -> dict[str, dict]:
    """{NAME@V: its latest judgement (with eval_run_id, judge, summary)} for every version judged."""
    rows = catalog.query(
        "SELECT j.id, j.eval_run_id, j.judge, j.judge_model, j.n, j.summary, j.created_at, v.adapter, v.version "
        "FROM judge_runs j JOIN eval_runs r ON r.id = j.eval_run_id JOIN adapter_versions v "
        "ON v.id = r.adapter_version_id ORDER BY j.id DESC")
    latest: dict[str, dict] = {}
    for r in rows:
        latest.setdefault(f"{r['adapter']}@{r['version']}", r)
    return latest


def run_and_store(catalog, judge: Judge, run: dict, samples: list[dict], *, seed: int = 0) -> dict:
    """Judge the run, store the judgement, return its row (``summary`` included)."""
    t = time.perf_counter()
    summary, items = judge_run(judge, run, samples, seed=seed)
    return store_judgement(catalog, run["id"], judge.spec, judge.kind, judge.model, summary, items,
                           judge.settings, time.perf_counter() - t)
