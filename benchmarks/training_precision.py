"""Training throughput by precision: fp32 vs bf16 vs NF4 (QLoRA) on one base.

    LORADEX_THREADS=1 .venv/bin/python -m benchmarks.training_precision [--base smollm2-135m-instruct]
        [--data examples/data/pirate.jsonl] [--batch-size 4] [--steps 8] [--rounds 2]

Each precision is loaded exactly as ``loradex train`` loads it (training.run.load_model)
and timed over the same batches (forward + backward + AdamW step), after one
warm-up step. Rounds alternate the precisions (A B C A B C) so that a neighbour's
load on a shared machine hits all of them alike. Prints steps/s per round and the
ratio of each to fp32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def time_steps(config, base_row, rows, pad_id, steps: int, precision: str) -> float:
    import torch

    from loradex.training.data import collate
    from loradex.training.run import load_model

    model = load_model(config, base_row["path"], "cpu", precision)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    bs = config.batch_size
    batches = [collate(rows[i * bs:(i + 1) * bs], pad_id) for i in range(steps + 1)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    t0 = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    from loradex.hub.bases import DEFAULT_BASE, get_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.loading import load_tokenizer
    from loradex.hub.settings import Settings, apply_threads
    from loradex.hub.store import Store
    from loradex.training.config import TrainConfig
    from loradex.training.data import load_dataset

    p = argparse.ArgumentParser(description="fp32 vs bf16 vs NF4 training steps/s")
    p.add_argument("--base", default=DEFAULT_BASE)
    p.add_argument("--data", default="examples/data/pirate.jsonl")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    settings = Settings()
    apply_threads(settings.threads)
    with Catalog.open(settings.catalog_path, wait_s=settings.lock_wait_s) as cat:
        base_row = get_base(cat, args.base, store=Store(settings.store))
    tok = load_tokenizer(base_row["path"], 2048)
    ds = load_dataset(args.data, tok, 256)
    variants = {"fp32": ("none", "fp32"), "bf16": ("none", "bf16"), "nf4": ("nf4", "fp32")}
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (quantize, precision) in variants.items():
            cfg = TrainConfig(data=args.data, name="bench", base=args.base, batch_size=args.batch_size,
                              quantize=quantize, precision=precision, dropout=0.0)
            results[name].append(time_steps(cfg, base_row, ds.rows, tok.pad_token_id, args.steps, precision))
            print(f"{name:5s} {results[name][-1]:.3f} steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    tokens = sum(len(r["input_ids"]) for r in ds.rows[: args.batch_size * args.steps]) / args.steps
    print(f"\nthreads={settings.threads} batch={args.batch_size} ~{tokens:.0f} tokens/step, median of {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:5s} {v:.3f} steps/s  x{v / med['fp32']:.2f} vs fp32")
    print(json.dumps({"steps_per_s": med, "rounds": results, "threads": settings.threads, "batch_size": args.batch_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
