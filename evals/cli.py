"""``loradex eval``, ``eval show``, ``leaderboard``, ``review export|import``.

    loradex eval NAME[@V|@ALIAS] [REF ...] [--all-of NAME] --data held_out.jsonl [--metrics similarity,exact,perplexity]
                 [--max-new-tokens 64] [--limit N] [--batch-size 8] [--quantize nf4 | --as-served] [--batch-invariant]
                 [--judge REF|URL [--judge-model ID] [--judge-max-tokens 96]]
    loradex eval show RUN [--worst 10]
    loradex leaderboard [--data FILE_OR_HASH] [--config KEY|as-served|none|nf4|int8] [--png board.png] [--json]
    loradex review export NAME[@V] --n 50 --out sheet.csv
    loradex review import sheet.csv
    loradex review pairs REVIEW_ID -o pairs.jsonl

``eval`` holds the catalog only to resolve the adapter and to store the run;
while the model generates, other commands (and ``loradex serve``) can use it.
"""
from __future__ import annotations

import argparse
import sys

from loradex.hub.errors import InvalidConfig, InvalidData
from loradex.hub.loading import QUANTIZE_CHOICES

from loradex.evals.config import config_label, is_served_default, served_warning


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value
    return parse


def _ci(m: dict | None, signed: bool = False) -> str:
    if not m:
        return "-"
    mean = m.get("mean", m.get("diff", m.get("rate")))
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(m['ci_low'])}, {f.format(m['ci_high'])}]"


def _run_text(run: dict, gate: dict | None = None) -> str:
    dec = run["decoding"] or {}
    t = dec.get("timings", {})
    lines = [f"eval run {run['id']}: {run.get('adapter')}@{run.get('version')} vs base {run['base']}, "
             f"n={run['n']}, data {run['data_sha256'][:12]} ({run['data_path']})"]
    for m, s in run["metrics"].items():
        b = (run["base_metrics"] or {}).get(m)
        p = (run["paired"] or {}).get(m)
        better = "" if p is None or p.get("higher_is_better", True) else " (lower is better)"
        lines.append(f"  {m:<11} {_ci(s)}  base {_ci(b)}  lift {_ci(p, signed=True)}{better}  [{s['method']}]")
    w = run.get("win_rate")
    if w:
        lines.append(f"  win rate ({w.get('metric')}): {w['rate']:.0%} [{w['ci_low']:.0%}, {w['ci_high']:.0%}] "
                     f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
    lines.append(f"  decoding: {dec.get('strategy')}, max_new_tokens={dec.get('max_new_tokens')}, "
                 f"batch={dec.get('batch_size')}, {dec.get('device')}/{dec.get('dtype')}, quantize={dec.get('quantize')}"
                 + (", batch-invariant" if dec.get("batch_invariant") else "")
                 + (", base outputs from cache" if dec.get("base_cached") else ""))
    batch = dec.get("batch")
    if batch:
        lines.append(f"  batches: {', '.join(batch['sides'])} ({batch['rows']} rows, up to "
                     f"{batch['max_rows_per_forward']} per forward; {batch['mode']})")
    cfg = run.get("serving_config")
    if cfg:
        served = "what `loradex serve` runs by default" if is_served_default(cfg) else "not the default server's configuration"
        lines.append(f"  scores describe: {config_label(cfg)} ({served}), engine {cfg.get('engine')}, config {run.get('config_key')}")
    else:
        lines.append("  scores describe: an unknown serving configuration (recorded before configs were)")
    if t:
        if "generate_s" in t:  # one engine pass for every adapter of the eval and the base
            lines.append(f"  time: {run['duration_s']:.1f}s total, {t.get('per_item_s', 0):.2f}s/item "
                         f"(load {t.get('load_s', 0):.1f}s, generation {t['generate_s']:.1f}s, "
                         f"perplexity {t.get('perplexity_s', 0):.1f}s, scoring {t.get('score_s', 0):.1f}s)")
        else:
            lines.append(f"  time: {run['duration_s']:.1f}s total, {t.get('per_item_s', 0):.2f}s/item "
                         f"(load {t.get('load_s', 0):.1f}s, adapter {t.get('adapter_s', 0):.1f}s, base {t.get('base_s', 0):.1f}s)")
    if run.get("zero_effect"):
        lines.append(f"  ZERO EFFECT: outputs equal the base's on {run.get('identical_rate') or 0:.0%} of items")
    elif run.get("identical_rate") is not None:
        lines.append(f"  outputs equal to the base's: {run['identical_rate']:.0%} of items")
    if run.get("forgetting"):
        from loradex.evals.record import forgetting_label

        lines.append(f"  {forgetting_label(run['forgetting'])} (forgetting run {run['forgetting']['id']})")
    if gate is not None:
        verdict = "would pass" if gate["ok"] else "would refuse: " + "; ".join(gate["reasons"])
        lines.append(f"  promotion gate: {verdict}")
    return "\n".join(lines)


def cmd_eval(ctx) -> int:
    args = ctx.args
    refs = list(args.refs)
    if refs[:1] == ["show"] and not args.all_of:
        if len(refs) != 2:
            raise InvalidConfig("use `loradex eval show RUN` with one eval run id")
        args.run = refs[1]
        return cmd_eval_show(ctx)
    if not refs and not args.all_of:
        raise InvalidConfig("name an adapter: `loradex eval NAME[@V|@ALIAS] ... --data FILE` or `--all-of NAME`")
    if args.forgetting_data and not args.forgetting:
        raise InvalidConfig("--forgetting-data needs --forgetting")
    if args.forgetting and not args.data and args.judge:
        raise InvalidConfig("--judge compares answers to --data FILE: give --data, or drop --judge for --forgetting alone")
    if not args.data and not args.forgetting:
        raise InvalidConfig("--data FILE is required: a JSONL held-out set (chat messages or prompt/completion); "
                            "or --forgetting alone for held-out loss on general text")
    if not args.data and (len(refs) != 1 or args.all_of):
        raise InvalidConfig("--forgetting without --data measures one adapter: name one, or give --data FILE")
    from loradex.evals.run import evaluate_many
    from loradex.evals.gate import check_promotion

    quantize, dtype, as_served = args.quantize, args.dtype, args.as_served
    if args.as_trained and (quantize or as_served):
        raise InvalidConfig("--as-trained chooses the quantization itself: drop --quantize / --as-served")
    chosen = quantize is not None or dtype is not None or args.as_trained
    server = _running_server(ctx, refs[0] if refs else args.all_of[0]) if not chosen else None
    if server is not None:  # a server owns the catalog: score the adapter as that server serves it
        quantize, dtype, as_served = server["quantize"], server["dtype"], False
        print(f"loradex: scoring as the running server serves it ({server['config_label']}); "
              f"pass --quantize or --as-trained for another configuration", file=sys.stderr)
    elif not chosen:
        as_served = True  # the default: as `loradex serve` serves it by default
    judge = _open_url_judge(ctx) if args.judge else None  # a judge that cannot answer fails before generation
    ctx.close_catalog()  # evaluate opens short-lived catalogs around the model work
    if not args.data:
        return _forgetting_only(ctx, refs[0], quantize, dtype, as_served)
    runs = evaluate_many(None, ctx.store, refs, args.data, all_of=args.all_of or (), metrics=args.metrics,
                         max_new_tokens=args.max_new_tokens, limit=args.limit, batch_size=args.batch_size,
                         seed=args.seed, settings=ctx.settings, quantize=quantize, device=args.device,
                         use_cache=not args.no_cache, progress=not args.no_progress and not ctx.as_json,
                         as_served=as_served, dtype=dtype, batch_invariant=args.batch_invariant)
    if args.judge and judge is None:  # a hub judge: loaded once, now that the eval's engine is freed
        judge = _load_hub_judge(ctx)
    from loradex.evals.record import zero_effect_line

    for run in runs:
        loud = zero_effect_line(run)
        if loud:
            print(f"loradex: {loud}", file=sys.stderr)
        if args.forgetting:  # same configuration as the task eval just measured
            run["forgetting"] = _forgetting(ctx, f"{run['adapter']}@{run['version']}",
                                            run["serving_config"]["quantize"], run["serving_config"]["dtype"], False,
                                            eval_run_id=run["id"])
    from loradex.hub.registry import get_version_by_id

    shown = []
    for run in runs:
        judgement = _judge(ctx, judge, run) if args.judge else None
        # the gate's verdict for the configuration just measured: these numbers say nothing about others
        gate = check_promotion(ctx.catalog, get_version_by_id(ctx.catalog, run["adapter_version_id"]),
                               config=run.get("serving_config"))
        warning = None if server is not None else served_warning(run, data=args.data)
        if warning:
            print(f"loradex: warning: {warning}", file=sys.stderr)
        shown.append(dict(run, gate=gate, warning=warning, judgement=judgement))
    if len(shown) == 1 and len(refs) == 1 and not args.all_of:
        run = shown[0]
        ctx.emit(run, lambda: _run_text(run, run["gate"]) + _judge_text([run["judgement"]] if run["judgement"] else []))
    else:
        ctx.emit({"runs": shown}, lambda: _many_text(shown))
    return 0


def _many_text(runs: list[dict]) -> str:
    """Each run as a single eval prints it, then one line per adapter (primary metric, lift)."""
    parts = [_run_text(r, r["gate"]) + _judge_text([r["judgement"]] if r.get("judgement") else []) for r in runs]
    batch = (runs[0]["decoding"] or {}).get("batch") or {}
    t = (runs[0]["decoding"] or {}).get("timings") or {}
    lines = [f"{len(runs)} adapters scored in one pass ({batch.get('rows')} rows, "
             f"{t.get('total_s', 0):.1f}s total, generation {t.get('generate_s', 0):.1f}s):"]
    for r in runs:
        metric = (r["decoding"] or {}).get("primary_metric") or next(iter(r["metrics"]))
        lines.append(f"  {r['adapter']}@{r['version']:<4} run {r['id']:<5} {metric} {_ci(r['metrics'][metric])}  "
                     f"lift {_ci((r['paired'] or {}).get(metric), signed=True)}")
    return "\n\n".join(parts) + "\n\n" + "\n".join(lines)


def _forgetting(ctx, ref: str, quantize, dtype, as_served, eval_run_id=None) -> dict:
    from loradex.evals.forgetting import measure_forgetting

    return measure_forgetting(None, ctx.store, ref, ctx.settings, data=ctx.args.forgetting_data,
                              quantize=quantize, dtype=dtype, as_served=as_served, device=ctx.args.device,
                              batch_size=ctx.args.batch_size * 2, seed=ctx.args.seed, eval_run_id=eval_run_id,
                              use_cache=not ctx.args.no_cache)


def _forgetting_only(ctx, ref: str, quantize, dtype, as_served) -> int:
    """``loradex eval REF --forgetting`` without --data: held-out loss on general text, and the gate's verdict."""
    from loradex.evals.config import config_label
    from loradex.evals.gate import check_promotion
    from loradex.evals.record import forgetting_label
    from loradex.hub.registry import get_version_by_id

    f = _forgetting(ctx, ref, quantize, dtype, as_served)
    gate = check_promotion(ctx.catalog, get_version_by_id(ctx.catalog, f["adapter_version_id"]),
                           config=f.get("serving_config"))

    def human() -> str:
        verdict = "would pass" if gate["ok"] else "would refuse: " + "; ".join(gate["reasons"])
        return (f"forgetting run {f['id']}: {f['adapter']}@{f['version']} vs base {f['base']} under "
                f"{config_label(f['serving_config'])}\n  {forgetting_label(f)}, {f['tokens']} tokens, "
                f"{f['duration_s']:.1f}s\n  promotion gate: {verdict}")

    ctx.emit({"forgetting": f, "gate": gate}, human)
    return 0


def _open_url_judge(ctx):
    """--judge URL: checked (and its model chosen) now; a hub ref: checked now, loaded after the eval's model is freed."""
    from loradex.evals.judge import check_spec, is_url, open_judge

    from loradex.evals.metrics import METRICS, parse_metrics

    args = ctx.args
    if not any(METRICS[m].needs_generation for m in parse_metrics(args.metrics)):
        raise InvalidConfig(f"--judge compares generated answers: add similarity or exact to --metrics {args.metrics}")
    check_spec(args.judge, ctx.catalog)
    if not is_url(args.judge):
        if args.judge_model:
            raise InvalidConfig("--judge-model names the model of a judge URL; a hub judge is named by --judge itself")
        return None
    return open_judge(args.judge, model=args.judge_model, max_tokens=args.judge_max_tokens)


def _load_hub_judge(ctx):
    from loradex.evals.judge import open_judge

    if not ctx.as_json:
        print(f"loradex: loading judge {ctx.args.judge}", file=sys.stderr)
    return open_judge(ctx.args.judge, max_tokens=ctx.args.judge_max_tokens, store=ctx.store,
                      settings=ctx.settings, device=ctx.args.device)


def _judge(ctx, judge, run: dict) -> dict:
    """Judge the stored run's samples adapter-vs-base in both orders and store the judgement."""
    import time

    from loradex.evals.judge import judge_run, store_judgement
    from loradex.evals.record import get_samples
    from loradex.hub.catalog import borrowed

    if judge is None:
        judge = _load_hub_judge(ctx)
    with borrowed(None, ctx.settings) as cat:
        samples = get_samples(cat, run["id"])
    t = time.perf_counter()
    summary, items = judge_run(judge, run, samples, seed=ctx.args.seed)
    with borrowed(None, ctx.settings) as cat:
        return store_judgement(cat, run["id"], judge.spec, judge.kind, judge.model, summary, items,
                               judge.settings, time.perf_counter() - t)


def _judge_text(judgements: list[dict]) -> str:
    from loradex.evals.judge import describe

    return "".join(f"\n  {describe(j['summary'], j['judge'])} [judgement {j['id']}]" for j in judgements)


def _running_server(ctx, ref: str) -> dict | None:
    """What the server that owns the catalog runs ({quantize, dtype, config_label}), if it serves ``ref``'s base."""
    from loradex.hub.registry import resolve
    from loradex.hub.remote import is_remote

    if not is_remote(ctx.catalog):
        return None
    info = ctx.catalog.get_json("/v1/server")
    if not info.get("config") or info.get("base") != resolve(ctx.catalog, ref)["base"]:
        return None
    return info


def cmd_eval_show(ctx) -> int:
    from loradex.evals.metrics import METRICS
    from loradex.evals.record import get_run, get_samples, worst_samples

    try:
        run_id = int(ctx.args.run)
    except ValueError:
        raise InvalidConfig(f"eval show RUN: RUN must be an eval run id (an integer), got {ctx.args.run!r}") from None
    run = get_run(ctx.catalog, run_id)
    samples = get_samples(ctx.catalog, run_id)
    judged = _judgements(ctx.catalog, run_id)
    metric = (run["decoding"] or {}).get("primary_metric") or next(iter(run["metrics"]))
    if ctx.args.worst:
        shown = worst_samples(samples, metric, METRICS[metric].higher_is_better, ctx.args.worst)
    else:
        shown = samples

    def human() -> str:
        out = [_run_text(run) + _judge_text(judged)]
        title = f"{len(shown)} worst items by {metric}" if ctx.args.worst else f"{len(shown)} items"
        out.append(f"\n{title}:")
        for s in shown:
            sc = s["scores"].get(metric)
            bs = (s["base_scores"] or {}).get(metric)
            out.append(f"\n  [{s['idx']}] {metric} {sc:.3f} (base {bs:.3f})" if bs is not None else f"\n  [{s['idx']}] {metric} {sc:.3f}")
            out.append(f"    prompt:    {_clip(s['prompt'], not ctx.args.worst)}")
            out.append(f"    reference: {_clip(s['reference'], not ctx.args.worst)}")
            if s["output"] is not None:
                out.append(f"    adapter:   {_clip(s['output'], not ctx.args.worst)}")
            if s["base_output"] is not None:
                out.append(f"    base:      {_clip(s['base_output'], not ctx.args.worst)}")
            for j in judged:
                v = j["items"].get(s["idx"])
                if v:
                    out.append(f"    judge {j['id']}:   adapter-first {v['verdict_ab'] or '?'} ({v['winner_ab'] or 'unparsed'}), "
                               f"base-first {v['verdict_ba'] or '?'} ({v['winner_ba'] or 'unparsed'})"
                               f"{'' if v['consistent'] else ', inconsistent'}: {_clip(v['raw_ab'], True)}")
        return "\n".join(out)

    ctx.emit({"run": run, "metric": metric, "samples": shown, "judgements": judged}, human)
    return 0


def _judgements(catalog, run_id: int) -> list[dict]:
    """The run's judgements, each with ``items`` = {idx: that item's verdicts and raw answers}."""
    from loradex.evals.judge import judgement_samples, judgements

    return [dict(j, items={v["idx"]: v for v in judgement_samples(catalog, j["id"])}) for j in judgements(catalog, run_id)]


def _clip(text: str | None, short: bool) -> str:
    text = (text or "").replace("\n", " / ")
    return text if not short or len(text) <= 100 else text[:97] + "..."


def cmd_leaderboard(ctx) -> int:
    from loradex.evals.judge import latest_judgements
    from loradex.evals.leaderboard import build, render_text, write_png
    from loradex.evals.review import describe_review, latest_reviews

    args = ctx.args
    if args.config and args.quantize and args.config != args.quantize:
        raise InvalidConfig(f"--config {args.config} and --quantize {args.quantize} disagree: give one of them")
    config = args.config or args.quantize
    sections = build(ctx.catalog, _data_key(args.data), config=config)
    png = str(write_png(sections, args.png)) if args.png and sections else None
    text = render_text(sections, config=config) + (f"\nchart written to {png}" if png else "")
    # human reviews and judges beside the task scores: one line per version on the board
    shown = list(dict.fromkeys(r["ref"] for s in sections for r in s["rows"]))
    reviews = {ref: r for ref, r in latest_reviews(ctx.catalog).items() if ref in shown}
    judged = {ref: j for ref, j in latest_judgements(ctx.catalog).items() if ref in shown}
    if reviews or judged:
        from loradex.evals.judge import describe

        text += "\n\nhuman reviews and judges (latest per version):"
        for ref in shown:
            if ref in reviews:
                text += f"\n  {ref:<24} {describe_review(reviews[ref])}"
            if ref in judged:
                text += f"\n  {ref:<24} {describe(judged[ref]['summary'], judged[ref]['judge'])} (eval run {judged[ref]['eval_run_id']})"
    ctx.emit({"sections": sections, "png": png, "config": config, "reviews": reviews, "judgements": judged}, text)
    return 0


def _data_key(data: str | None) -> str | None:
    """A data file is named by its sha256, which means the same on this machine and on a server."""
    from pathlib import Path

    from loradex.hub.store import file_sha256

    return file_sha256(data) if data and Path(data).is_file() else data


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).expanduser().absolute())


def cmd_review_export(ctx) -> int:
    from loradex.evals.review import export_sheet

    res = export_sheet(ctx.catalog, ctx.args.ref, _absolute(ctx.args.out), n=ctx.args.n, seed=ctx.args.seed)
    short = f" (only {res['n']} items in eval run {res['eval_run_id']})" if res["n"] < ctx.args.n else ""
    ctx.emit(res, f"review {res['review_id']}: wrote {res['n']} blinded rows for {res['adapter']}@{res['version']} "
                  f"to {res['sheet']}{short}\nfill the rating column ({res['scale']}), "
                  f"then run `loradex review import {ctx.args.out}`")
    return 0


def cmd_review_import(ctx) -> int:
    from loradex.evals.review import import_sheet

    res = import_sheet(ctx.catalog, _absolute(ctx.args.sheet))
    ctx.emit(res, f"review {res['review_id']} of {res['adapter']}@{res['version']}: {res['n']} ratings stored; "
                  f"adapter preferred on {res['adapter_preferred']}, base on {res['base_preferred']}, {res['ties']} ties; "
                  f"human preference rate for the adapter {res['preference_rate']:.0%} "
                  f"[95% CI {res['ci_low']:.0%}, {res['ci_high']:.0%}] ({res['method']})")
    return 0


def cmd_review_pairs(ctx) -> int:
    from loradex.evals.review import review_pairs, write_pairs

    res = review_pairs(ctx.catalog, ctx.args.review_id)
    if not res["pairs"]:
        raise InvalidData(f"review {res['review_id']}: no preference to export ({res['ties']} ties, "
                          f"{res['identical']} rows with identical answers, of {res['rated']} rated)")
    out = write_pairs(res, _absolute(ctx.args.out))
    data = {k: v for k, v in res.items() if k != "pairs"} | {"out": str(out)}
    ctx.emit(data, f"review {res['review_id']} of {res['adapter']}@{res['version']}: wrote {res['n']} chosen/rejected "
                   f"pairs to {out} ({res['ties']} ties and {res['identical']} identical answers dropped; prompts from "
                   f"{res['prompt_source']})\ntrain on them: `loradex train --method dpo --data {ctx.args.out} "
                   f"--from {res['adapter']}@{res['version']} --name NAME`")
    return 0


def add_commands(sub, common) -> None:
    from loradex.evals.metrics import METRICS

    p = sub.add_parser("eval", parents=[common],
                       help="score adapters against their base on held-out data, many in one pass (or: eval show RUN)",
                       description="loradex eval REF [REF ...] [--all-of NAME] --data FILE ... | "
                                   "loradex eval show RUN [--worst N]")
    p.add_argument("refs", nargs="*", metavar="REF",
                   help="NAME, NAME@VERSION or NAME@ALIAS, one or more (all scored in one pass on the serving engine); "
                        "or the word `show` followed by a run id")
    p.add_argument("--all-of", action="append", metavar="NAME",
                   help="also score every ready version of NAME (repeatable)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run each row's forward by itself, so outputs do not depend on batch size or neighbours "
                        "(slower; see docs/evals.md)")
    p.add_argument("--data", help="held-out JSONL: chat `messages` (last assistant turn = reference) or prompt/completion")
    p.add_argument("--metrics", default="similarity", help=f"comma-separated: {', '.join(METRICS)} (default similarity)")
    p.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=64, help="greedy tokens per item (default 64)")
    p.add_argument("--limit", type=_positive_int("--limit"), help="score only the first N items")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8,
                   help="items per batch (default 8); the engine runs that many items of every adapter and the base per forward")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="load the base quantized so (default: as served, see --as-served; a warning says when the "
                        "configuration is not what `loradex serve` runs)")
    p.add_argument("--as-served", action="store_true",
                   help="the default: score as the adapter is served: as the running server serves it when one owns "
                        "the catalog, else as `loradex serve` does by default (nf4, the device's dtype)")
    p.add_argument("--as-trained", action="store_true",
                   help="score under the quantization the adapter was trained with (none or nf4)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="compute dtype (default as the server's: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-cache", action="store_true", help="recompute the base's outputs even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--forgetting", action="store_true",
                   help="also score held-out loss of base and adapter on the shipped general-text set (change with a "
                        "95%% CI, stored; the gate refuses regressions beyond LORADEX_GATE_MAX_FORGETTING); "
                        "alone without --data it runs only that")
    p.add_argument("--forgetting-data", help="another general-text JSONL of {\"text\": ...} rows for --forgetting")
    p.add_argument("--worst", type=_positive_int("--worst"), help="with `eval show RUN`: only the N worst items")
    p.add_argument("--judge", help="also judge adapter vs base per item, in both orders: a base or adapter of this hub "
                                   "(NAME[@V], loaded here) or an OpenAI-compatible URL (http://host:port/v1; key "
                                   "from LORADEX_JUDGE_API_KEY)")
    p.add_argument("--judge-model", help="with --judge URL: the model id to ask (default: the first of its /models)")
    p.add_argument("--judge-max-tokens", type=_positive_int("--judge-max-tokens"), default=96,
                   help="tokens the judge may write per verdict (default 96)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("leaderboard", parents=[common], help="adapter versions ranked by eval score, with CIs and lift")
    p.add_argument("--data", help="only this data set: a JSONL file or its sha256 (prefix)")
    p.add_argument("--config", help="only scores measured under this serving configuration: a config key (prefix), "
                                    "as-served (what `loradex serve` runs by default), or none | nf4 | int8")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="only scores measured with the base quantized so")
    p.add_argument("--png", help="also write a bar chart with 95%% error bars to this PNG file")
    p.set_defaults(func=cmd_leaderboard)

    review = sub.add_parser("review", parents=[common], help="blinded human A/B review sheets")
    rsub = review.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    p = rsub.add_parser("export", parents=[common], help="write a blinded A/B sheet from the latest eval's outputs")
    p.add_argument("ref", help="NAME or NAME@VERSION")
    p.add_argument("--n", type=_positive_int("--n"), default=50, help="rows to sample (default 50)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--seed", type=int, help="fix the sampling and A/B order (default: random)")
    p.set_defaults(func=cmd_review_export)
    p = rsub.add_parser("import", parents=[common], help="validate a filled sheet, store ratings, report preference")
    p.add_argument("sheet", help="the filled CSV sheet")
    p.set_defaults(func=cmd_review_import)
    p = rsub.add_parser("pairs", parents=[common], help="export a rated review as chosen/rejected pairs (JSONL) for DPO")
    p.add_argument("review_id", type=_positive_int("REVIEW_ID"), help="the review round's id (see `loradex show NAME`)")
    p.add_argument("-o", "--out", required=True, help="JSONL file to write: {prompt, chosen, rejected} chat messages")
    p.set_defaults(func=cmd_review_pairs)
