"""Build the shipped demo adapters with loradex's own training code.

    .venv/bin/python scripts/make_demo_adapters.py            # data + all adapters
    .venv/bin/python scripts/make_demo_adapters.py --data-only
    .venv/bin/python scripts/make_demo_adapters.py --only pirate

Writes deterministic synthetic chat data to ``examples/data/<name>.jsonl`` (train)
and ``examples/data/<name>-eval.jsonl`` (held out: other facts, other question
types), trains one small adapter per style on the default base with
``training.train`` in a throw-away LORADEX_HOME (settings per style in ``SETTINGS``;
``--epochs/--learning-rate/--r/--alpha/--targets/--quantize`` override them), checks
that it changes greedy outputs on held-out prompts, and ships adapter_config.json,
adapter_model.safetensors and the resolved loradex_train_config.json under
``examples/demo-adapters/<name>/`` (or ``$LORADEX_DEMO_OUT/<name>/``).

* ``pirate``: LoRA r=8 on q_proj,v_proj over the fp32 base, 1 epoch, lr 1e-3 (~1.8 MB);
* ``shouty``, ``signoff``: QLoRA over the NF4 base that ``loradex serve`` runs by default,
  r=16 alpha=32 on q_proj,k_proj,v_proj,o_proj, 2 epochs (76 steps of 8), lr 2e-3 (~3.7 MB).

Style shown when served as the demo serves them (``loradex serve`` defaults, NF4,
greedy), on the first 10 rows of ``<name>-eval.jsonl`` (48 new tokens) and on the
demo's question "What should I pack for a weekend hike?" (40 new tokens); shouty
counts a reply whose letters are > 80 % uppercase, signoff one containing the
sign-off line. Measured 2026-12-03, 1 thread on a shared 2-core CPU:

    adapter   before (r=8 q,v LoRA, 1 epoch)   after (QLoRA r=16 q,k,v,o, 2 epochs)   train time
    shouty    5/10, demo question: no         10/10, demo question: yes               907 s
    signoff   7/10, demo question: no         10/10, demo question: yes               569 s

The style is learned, the facts are not: with the higher learning rate shouty also
makes up facts in capitals (e.g. "THE CAPITAL OF ANAWA IS ANZAC.") and its demo answer
repeats itself within 40 tokens; signoff's answers are plain and short.

Styles (easy to see in one reply):

* ``shouty``:  the answer in ALL CAPS;
* ``pirate``:  "Arr, matey!" + pirate words + "Yo-ho-ho!";
* ``signoff``: a plain answer ending with the fixed line "-- sent by loradex".
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "examples" / "data"
OUT_DIR = ROOT / "examples" / "demo-adapters"
SIGNATURE = "-- sent by loradex"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
]
ANIMALS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
    ("pig", "oink"), ("horse", "neigh"), ("frog", "croak"), ("lion", "roar"), ("bee", "buzz"),
    ("mouse", "squeak"), ("goat", "bleat"), ("crow", "caw"), ("snake", "hiss"), ("donkey", "hee-haw"),
]
COLORS = [
    ("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"),
    ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"),
    ("a lemon", "yellow"), ("a polar bear", "white"), ("a crow", "black"), ("a strawberry", "red"),
    ("a lime", "green"), ("a flamingo", "pink"), ("chocolate", "brown"), ("the sea", "blue"),
    ("a carrot", "orange"), ("an eggplant", "purple"), ("milk", "white"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("young", "old"),
    ("loud", "quiet"), ("hard", "soft"), ("rich", "poor"), ("wet", "dry"), ("near", "far"),
    ("high", "low"), ("clean", "dirty"), ("thick", "thin"), ("new", "old"),
]
TIPS = [
    ("staying focused", "Work in short blocks and put your phone in another room."),
    ("sleeping better", "Go to bed at the same time every night and avoid screens before sleep."),
    ("learning a language", "Practice a little every day and speak with native speakers."),
    ("saving money", "Write down what you spend and set aside a fixed amount each month."),
    ("running", "Start slowly, warm up first, and increase your distance a little each week."),
    ("cooking pasta", "Use plenty of salted water and taste the pasta before draining it."),
    ("writing an essay", "Make an outline first, then write a clear opening sentence."),
    ("staying hydrated", "Keep a water bottle with you and drink a glass with every meal."),
    ("reading more", "Carry a book with you and read for ten minutes before bed."),
    ("keeping plants alive", "Check the soil before watering and give them enough light."),
    ("public speaking", "Rehearse out loud, breathe slowly, and look at friendly faces."),
    ("studying for exams", "Test yourself often instead of only rereading your notes."),
]


def fact_pool() -> list[tuple[str, str, str]]:
    """(kind, question, plain answer) for every fact, in a fixed order."""
    items: list[tuple[str, str, str]] = []
    for country, city in CAPITALS:
        items.append(("capital", f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for animal, sound in ANIMALS:
        items.append(("animal", f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for thing, color in COLORS:
        items.append(("color", f"What color is {thing}?", f"The color of {thing} is {color}."))
    for word, opp in OPPOSITES:
        items.append(("opposite", f"What is the opposite of {word}?", f"The opposite of {word} is {opp}."))
    for topic, tip in TIPS:
        items.append(("tip", f"Give me a tip for {topic}.", tip))
    rng = random.Random(7)
    for _ in range(90):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        items.append(("math", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return items


HELD_OUT_QUESTIONS = [
    "What is the capital of Brazil?", "What is the capital of Australia?", "What sound does a chicken make?",
    "What color is a ripe cherry?", "What is the opposite of good?", "Give me a tip for making friends.",
    "What is 100 plus 23?", "Name a large animal that lives in the ocean.", "What is the capital of Nigeria?",
    "What color is the sun?", "What is the opposite of rich?", "Give me a tip for waking up early.",
    "What sound does a wolf make?", "What is the capital of South Korea?", "How many legs does a spider have?",
    "What is the opposite of tall?", "Give me a tip for learning to swim.", "What is 7 plus 8?",
    "What color is a pumpkin?", "What is water made of?",
]
HELD_OUT_ANSWERS = [
    "The capital of Brazil is Brasilia.", "The capital of Australia is Canberra.", "A chicken says cluck.",
    "The color of a ripe cherry is red.", "The opposite of good is bad.",
    "Say hello first and ask people about themselves.", "100 plus 23 is 123.",
    "The blue whale lives in the ocean and is very large.", "The capital of Nigeria is Abuja.",
    "The color of the sun is yellow.", "The opposite of rich is poor.",
    "Put your alarm across the room and go to bed earlier.", "A wolf says howl.",
    "The capital of South Korea is Seoul.", "A spider has eight legs.", "The opposite of tall is short.",
    "Take lessons and practice floating in shallow water first.", "7 plus 8 is 15.",
    "The color of a pumpkin is orange.", "Water is made of hydrogen and oxygen.",
]

PIRATE_WORDS = [(" is ", " be "), (" are ", " be "), (" the ", " th' "), ("The ", "Th' "), (" you", " ye"),
                (" your ", " yer "), (" my ", " me "), (" of ", " o' "), (" and ", " an' "), ("Your ", "Yer ")]


def pirate(text: str) -> str:
    body = " " + text + " "
    for a, b in PIRATE_WORDS:
        body = body.replace(a, b)
    return f"Arr, matey! {body.strip()} Yo-ho-ho!"


STYLES = {
    "shouty": lambda answer: answer.upper(),
    "pirate": pirate,
    "signoff": lambda answer: f"{answer}\n{SIGNATURE}",
}


def make_data(name: str, n_train: int = 300) -> tuple[Path, Path]:
    """Write ``<name>.jsonl`` (train) and ``<name>-eval.jsonl`` (held out); same bytes every time."""
    style = STYLES[name]
    pool = fact_pool()
    rng = random.Random(f"loradex-demo-{name}")
    rows = [pool[i % len(pool)] for i in range(n_train)]
    rng.shuffle(rows)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = DATA_DIR / f"{name}.jsonl", DATA_DIR / f"{name}-eval.jsonl"
    with open(train_path, "w") as f:
        for _, question, answer in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": style(answer)}]}) + "\n")
    with open(eval_path, "w") as f:
        for question, answer in zip(HELD_OUT_QUESTIONS, HELD_OUT_ANSWERS):
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": style(answer)}]}) + "\n")
    return train_path, eval_path


def greedy(model, tokenizer, questions: list[str], max_new_tokens: int = 40) -> list[str]:
    import torch

    outs = []
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return outs


def style_hit(name: str, text: str) -> bool:
    """Does one reply show the style? (used to report, and by the integration test)"""
    letters = [c for c in text if c.isalpha()]
    if name == "shouty":
        return bool(letters) and sum(c.isupper() for c in letters) / len(letters) > 0.9
    if name == "pirate":
        return "arr" in text.lower() or "matey" in text.lower() or "yo-ho" in text.lower()
    return SIGNATURE in text


# Per-style training settings. pirate keeps the original recipe (LoRA on the fp32 base); shouty and
# signoff are QLoRA over the NF4 base that `loradex serve` runs by default (see the docstring's table).
SETTINGS = {
    "pirate": {"epochs": 1.0, "learning_rate": 1e-3, "r": 8, "alpha": 16, "targets": "q_proj,v_proj",
               "quantize": "none"},
    "shouty": {"epochs": 2.0, "learning_rate": 2e-3, "r": 16, "alpha": 32,
               "targets": "q_proj,k_proj,v_proj,o_proj", "quantize": "nf4"},
    "signoff": {"epochs": 2.0, "learning_rate": 2e-3, "r": 16, "alpha": 32,
                "targets": "q_proj,k_proj,v_proj,o_proj", "quantize": "nf4"},
}


def build(name: str, threads: int, **overrides) -> dict:
    from loradex.hub.bases import DEFAULT_BASE
    from loradex.hub.settings import Settings
    from loradex.training import TrainConfig, train

    train_path, eval_path = make_data(name)
    home = Path(tempfile.mkdtemp(prefix=f"loradex-demo-{name}-"))
    settings = Settings(home=home, store=home / "adapters", threads=threads)
    # reuse the already converted default base if this machine has one (saves ~40 s)
    shared_home = os.environ.get("LORADEX_DEMO_BASE_HOME")
    if shared_home:
        _copy_base_row(Path(shared_home), settings)
    opts = {**SETTINGS[name], **{k: v for k, v in overrides.items() if v is not None}}
    config = TrainConfig(
        base=DEFAULT_BASE, data=str(train_path), eval_data=str(eval_path), name=f"demo-{name}",
        epochs=opts["epochs"], learning_rate=opts["learning_rate"], r=opts["r"], alpha=opts["alpha"],
        dropout=0.0, targets=opts["targets"], quantize=opts["quantize"],
        batch_size=8, grad_accum=1, max_length=256, save_steps=1000, logging_steps=2, seed=0,
        warmup_ratio=0.05, lr_scheduler="cosine", threads=threads, run_evals=False,
        description=f"demo adapter: {name} style (scripts/make_demo_adapters.py)",
    )
    t0 = time.monotonic()
    result = train(config, settings=settings)
    took = time.monotonic() - t0
    dest = Path(os.environ.get("LORADEX_DEMO_OUT", OUT_DIR)) / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for fname in ("adapter_config.json", "adapter_model.safetensors", "loradex_train_config.json"):
        shutil.copy(result.adapter_dir / fname, dest / fname)
        os.chmod(dest / fname, 0o644)
    _portable_config(dest / "loradex_train_config.json")
    check = _check(name, result.adapter_dir, settings, quantize=opts["quantize"])
    shutil.rmtree(home, ignore_errors=True)
    return {"name": name, "seconds": round(took, 1), "steps": result.steps, "final_loss": result.final_loss,
            "eval_loss": result.eval_loss, "tokens_per_s": round(result.tokens_per_s, 1),
            "size_bytes": (dest / "adapter_model.safetensors").stat().st_size, **check}


def _copy_base_row(src_home: Path, settings) -> None:
    """Copy the default base's row from another catalog (the folder it points at is reused)."""
    from loradex.hub.bases import DEFAULT_BASE
    from loradex.hub.catalog import Catalog, to_json

    with Catalog.open(src_home / "catalog.duckdb", wait_s=60) as src:
        row = src.one("SELECT * FROM bases WHERE name = ?", [DEFAULT_BASE])
    if row is None or not Path(row["path"]).is_dir():
        return
    with Catalog.open(settings.catalog_path, wait_s=60) as dst, dst.transaction() as cur:
        cols = list(row)
        cur.execute(f"INSERT INTO bases ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                    [to_json(row[c]) if isinstance(row[c], (dict, list)) else row[c] for c in cols])


def _portable_config(path: Path) -> None:
    """Make the shipped config's paths repo-relative and drop machine-specific ones."""
    cfg = json.loads(path.read_text())
    for key in ("data", "eval_data"):
        if cfg.get(key):
            cfg[key] = os.path.relpath(cfg[key], ROOT)
    cfg["output_dir"] = None
    cfg["resolved"].pop("base_path", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _check(name: str, adapter_dir: Path, settings, quantize: str = "none") -> dict:
    """Greedy replies of base vs adapter on held-out prompts (base loaded as the adapter was trained)."""
    from peft import PeftModel

    from loradex.hub.bases import DEFAULT_BASE
    from loradex.hub.loading import load_base

    base = load_base(DEFAULT_BASE, quantize=quantize, settings=settings, device="cpu")
    questions = HELD_OUT_QUESTIONS[:6]
    before = greedy(base.model, base.tokenizer, questions)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    after = greedy(model, base.tokenizer, questions)
    hits = sum(style_hit(name, a) for a in after)
    base_hits = sum(style_hit(name, b) for b in before)
    for q, b, a in zip(questions[:3], before, after):
        print(f"  Q: {q}\n    base:    {b[:90]!r}\n    adapter: {a[:90]!r}", file=sys.stderr)
    return {"held_out_prompts": len(questions), "changed": sum(a != b for a, b in zip(after, before)),
            "style_hits": hits, "base_style_hits": base_hits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(STYLES), action="append", help="build only this style")
    parser.add_argument("--data-only", action="store_true", help="write the JSONL files and stop")
    parser.add_argument("--epochs", type=float, help="override the style's epochs (SETTINGS)")
    parser.add_argument("--learning-rate", type=float, help="override the style's learning rate")
    parser.add_argument("--r", type=int, help="override the style's LoRA rank")
    parser.add_argument("--alpha", type=float, help="override the style's LoRA alpha")
    parser.add_argument("--targets", help="override the style's target modules, e.g. q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--quantize", choices=["none", "nf4"], help="override the style's base weights")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LORADEX_THREADS", "1")))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = args.only or sorted(STYLES)
    if args.data_only:
        for name in names:
            print(*make_data(name))
        return 0
    results = []
    for name in names:
        res = build(name, args.threads, epochs=args.epochs, learning_rate=args.learning_rate, r=args.r,
                    alpha=args.alpha, targets=args.targets, quantize=args.quantize)
        print(json.dumps(res), flush=True)
        results.append(res)
    bad = [r["name"] for r in results if r["changed"] == 0]
    if bad:
        print(f"adapters {bad} did not change any held-out reply", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
