"""The serving engine on the tiny random Llama: batched LoRA vs PEFT, mixed batches, cache, failures."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from tests.helpers import make_adapter

ADAPTER_SPECS = {  # name: (rank, targets, seed)
    "qv8": (8, ("q_proj", "v_proj"), 1),
    "all4": (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2),
    "vd16": (16, ("v_proj", "down_proj"), 3),
    "q2": (2, ("q_proj",), 4),
    "kv8": (8, ("k_proj", "v_proj"), 5),
}
PROMPTS = ["The quick brown fox", "Once upon a time there was", "1 2 3 4 5 6 7 8 9 10 11 12"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {name: make_adapter(tiny_base_dir, root / name, r=r, alpha=2 * r, targets=t, seed=s, scale=0.3)
            for name, (r, t, s) in ADAPTER_SPECS.items()}


@pytest.fixture(scope="module")
def env(tiny_base_dir, adapter_dirs, tmp_path_factory):
    """A catalog with base 'tiny' and the adapters registered, and an engine over it (max_loaded 3)."""
    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.registry import register_adapter
    from loradex.hub.store import Store
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    root = tmp_path_factory.mktemp("engine-home")
    cat = Catalog.open(root / "catalog.duckdb")
    store = Store(root / "store")
    add_base(cat, store, "tiny", str(tiny_base_dir))
    for name, folder in adapter_dirs.items():
        register_adapter(cat, store, folder, name, base="tiny")
    engine = Engine.load(EngineConfig(base="tiny", quantize="none", max_loaded=3, batch_window_ms=20),
                         catalog=cat, store=store)
    yield {"catalog": cat, "store": store, "engine": engine, "root": root}
    engine.shutdown()
    cat.close()


def greedy(engine, prompt, adapter=None, n=12):
    return engine.generate(prompt, adapter=adapter, max_tokens=n, temperature=0)


def test_batched_lora_matches_peft(tiny_base_dir, adapter_dirs):
    """Our LoRA path vs PEFT for the same adapters: last-token logits close, greedy tokens equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradex.serving.lora import LoRABank, read_adapter
    from loradex.serving.runner import Runner

    names = ["qv8", "all4", "vd16"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32),
                                     adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(adapter_dirs[n], adapter_name=n)
    peft.eval()
    prompts = [[1, 5, 17, 300, 4000, 22], [1, 99, 12], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    ref = {}
    with torch.inference_mode():
        for n in names:
            peft.set_adapter(n)
            for j, p in enumerate(prompts):
                logits = peft(torch.tensor([p])).logits[0, -1]
                out = peft.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
                ref[n, j] = (logits, out[0, len(p):].tolist())
        with peft.disable_adapter():
            for j, p in enumerate(prompts):
                ref[None, j] = (peft(torch.tensor([p])).logits[0, -1], None)

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    bank = LoRABank(model, torch.float32, "cpu", capacity=1)  # grows as slots are written
    for slot, n in enumerate(names):
        bank.write(slot, read_adapter(adapter_dirs[n]))
    runner = Runner(model)
    rows = [(-1, 0), (0, 1), (1, 2), (2, 0), (0, 0), (1, 1), (2, 2)]  # (slot, prompt), bare base included
    bank.ctx.set_rows([s for s, _ in rows])
    logits, cache = runner.prefill([prompts[j] for _, j in rows])
    tokens = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(9):
        step = runner.decode([t[-1] for t in tokens], cache)
        for i, t in enumerate(step.argmax(-1)):
            tokens[i].append(int(t))
    bank.ctx.clear()
    for i, (slot, j) in enumerate(rows):
        name = names[slot] if slot >= 0 else None
        want_logits, want_tokens = ref[name, j]
        assert torch.allclose(logits[i], want_logits, atol=1e-4, rtol=0), (name, j)
        if want_tokens is not None:
            assert tokens[i] == want_tokens, (name, j)
    # the adapters really change the output (the comparison above is not vacuous)
    assert not torch.allclose(ref["qv8", 0][0], ref[None, 0][0], atol=1e-3)


def test_mixed_batch_rows_equal_solo_runs(env):
    eng = env["engine"]
    specs = [(p, a) for p in PROMPTS for a in (None, "qv8", "all4")]
    solo = {(p, a): greedy(eng, p, a).token_ids for p, a in specs}
    batch = eng.generate_batch([{"prompt": p, "adapter": a, "max_tokens": 12, "temperature": 0} for p, a in specs])
    for (p, a), out in zip(specs, batch):
        assert out.token_ids == solo[p, a], (p, a)
    assert len({tuple(solo[PROMPTS[0], a]) for a in (None, "qv8", "all4")}) == 3  # adapters differ from base
    # it really was batched: some forward held more than one row
    text = eng.metrics.render()
    counts = {line.split("le=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith('loradex_batch_size_bucket{phase="decode"')}
    assert counts["+Inf"] > counts["1"]


def test_request_joining_mid_decode_equals_solo(env):
    """Continuous batching: a request arriving while another decodes joins it and still equals its solo run.

    The second request is submitted from the first one's sink on its 5th token (on
    the engine thread), so it surely arrives mid-decode; the step record then
    shows both rows in one decode step with the first still running after it.
    """
    eng = env["engine"]
    solo_long = greedy(eng, PROMPTS[1], "vd16", n=60).token_ids
    solo_short = greedy(eng, PROMPTS[0], "qv8", n=8).token_ids

    def prepare(prompt, adapter, n):
        target = eng.resolve(adapter=adapter)
        ids = eng.encode(prompt)
        return ids, target, eng.params_for(len(ids), max_tokens=n, temperature=0)

    short_req = prepare(PROMPTS[0], "qv8", 8)
    tokens = {"long": [], "short": []}
    errors, handles = [], {}
    done = {"long": threading.Event(), "short": threading.Event()}

    def sink_for(name):
        def sink(ev):
            tokens[name] += ev.token_ids
            if ev.error is not None:
                errors.append(ev.error)
            if name == "long" and len(tokens["long"]) == 5 and "short" not in handles:
                handles["short"] = eng.submit(*short_req, sink_for("short"))
            if ev.done:
                done[name].set()
        return sink

    handles["long"] = eng.submit(*prepare(PROMPTS[1], "vd16", 60), sink_for("long"))
    assert done["long"].wait(60) and done["short"].wait(60)
    assert not errors
    assert tokens == {"long": solo_long, "short": solo_short}

    long_id, short_id = handles["long"].id, handles["short"].id
    steps = [s for s in eng.scheduler.recent_steps() if long_id in s["ids"] or short_id in s["ids"]]
    decodes = [s for s in steps if s["phase"] == "decode"]
    shared = [s for s in decodes if long_id in s["ids"] and short_id in s["ids"]]
    assert shared, steps
    assert any(s["step"] < shared[0]["step"] and s["ids"] == [long_id] for s in decodes)  # long ran alone first
    assert any(s["step"] > shared[-1]["step"] and long_id in s["ids"] for s in decodes)  # and went on after
    labels = dict(zip(shared[0]["ids"], shared[0]["labels"]))
    assert labels == {long_id: "vd16@1", short_id: "qv8@1"}


def test_sampling_params_per_row_in_a_mixed_batch(env):
    eng = env["engine"]
    alone = eng.generate(PROMPTS[0], adapter="all4", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    again = eng.generate(PROMPTS[0], adapter="all4", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    assert alone.token_ids == again.token_ids
    batch = eng.generate_batch([
        {"prompt": PROMPTS[0], "adapter": "all4", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 7},
        {"prompt": PROMPTS[0], "adapter": "all4", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 8},
        {"prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0},
        {"prompt": PROMPTS[2], "adapter": "qv8", "max_tokens": 5, "temperature": 1.5, "seed": 1},
    ])
    assert batch[0].token_ids == alone.token_ids
    assert batch[1].token_ids != alone.token_ids
    assert batch[2].completion_tokens == 3 and batch[2].finish_reason == "length"
    assert batch[3].completion_tokens == 5


def test_stop_strings_end_generation_without_the_stop_text(env):
    eng = env["engine"]
    full = greedy(eng, PROMPTS[0], "qv8", n=12)
    stop = full.text[4:7]
    assert stop and stop in full.text
    out = eng.generate(PROMPTS[0], adapter="qv8", max_tokens=12, temperature=0, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]


def test_lru_eviction_pins_and_counters(env):
    eng = env["engine"]
    m = eng.metrics
    loads0, evict0 = m.total("adapter_loads_total"), m.total("adapter_evictions_total")
    expected = {a: greedy(eng, PROMPTS[2], a, n=6).token_ids for a in ADAPTER_SPECS}
    for _ in range(2):
        for a in ADAPTER_SPECS:  # 5 adapters in rotation over 3 slots
            assert greedy(eng, PROMPTS[2], a, n=6).token_ids == expected[a]
            assert len(eng.cache.entries) <= 3
    assert m.total("adapter_loads_total") - loads0 >= 10
    assert m.total("adapter_evictions_total") - evict0 >= 8
    hits0 = m.total("adapter_hits_total")
    greedy(eng, PROMPTS[2], "kv8", n=2)  # most recent: still loaded
    assert m.total("adapter_hits_total") == hits0 + 1
    eng.pin("q2")
    for a in ADAPTER_SPECS:
        greedy(eng, PROMPTS[2], a, n=2)
    assert any(e["adapter"] == "q2" and e["pinned"] for e in eng.cache.loaded())


def _load_count(eng) -> float:
    for line in eng.metrics.render().splitlines():
        if line.startswith("loradex_adapter_load_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_a_cold_adapter_is_loaded_once_and_timed(env):
    """The first request for an adapter loads it (timed into the histogram); the next ones reuse it.
    How fast the load is is the cold_load benchmark's figure (make bench), not a timed assertion."""
    eng = env["engine"]
    eng.forget(eng.resolve(adapter="vd16@1").row)  # make sure it is cold
    before = _load_count(eng)
    eng.generate(PROMPTS[0], adapter="vd16@1", max_tokens=1, temperature=0)
    assert _load_count(eng) == before + 1 and eng.cache.last_load_s is not None
    eng.generate(PROMPTS[1], adapter="vd16@1", max_tokens=1, temperature=0)
    assert _load_count(eng) == before + 1  # warm: no second load


def test_corrupted_adapter_fails_only_its_requests(env, tmp_path, tiny_base_dir):
    from loradex.hub.errors import IntegrityError
    from loradex.hub.registry import register_adapter

    cat, store, eng = env["catalog"], env["store"], env["engine"]
    folder = make_adapter(tiny_base_dir, tmp_path / "bad", r=4, targets=("q_proj",), seed=99, scale=0.3)
    row = register_adapter(cat, store, folder, "soon-corrupt", base="tiny")
    weights = store.resolve(row["path"]) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    good = greedy(eng, PROMPTS[0], "qv8").token_ids
    failures0 = eng.metrics.total("adapter_load_failures_total")
    outs = {}

    def run(name, adapter):
        try:
            outs[name] = greedy(eng, PROMPTS[0], adapter).token_ids
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outs[name] = exc

    threads = [threading.Thread(target=run, args=(n, a)) for n, a in
               (("bad", "soon-corrupt"), ("good", "qv8"), ("base", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(outs["bad"], IntegrityError) and "sha256" in str(outs["bad"])
    assert outs["good"] == good
    assert isinstance(outs["base"], list)
    assert eng.metrics.total("adapter_load_failures_total") == failures0 + 1


def test_hot_registration_is_servable_at_next_request(env, tmp_path, tiny_base_dir):
    from loradex.hub.registry import register_adapter, set_alias
    from loradex.serving.errors import ModelNotFound

    cat, store, eng = env["catalog"], env["store"], env["engine"]
    with pytest.raises(ModelNotFound):
        eng.generate("hi", adapter="late", max_tokens=2)
    register_adapter(cat, store, make_adapter(tiny_base_dir, tmp_path / "late1", r=4, seed=11, scale=0.3), "late", base="tiny")
    v1 = greedy(eng, PROMPTS[0], "late").token_ids
    register_adapter(cat, store, make_adapter(tiny_base_dir, tmp_path / "late2", r=4, seed=12, scale=0.3), "late", base="tiny")
    assert greedy(eng, PROMPTS[0], "late@1").token_ids == v1
    v2 = greedy(eng, PROMPTS[0], "late").token_ids  # the bare name now means version 2
    assert v2 != v1
    set_alias(cat, "late@1", "stable")
    assert greedy(eng, PROMPTS[0], "late@stable").token_ids == v1


def test_resolution_and_limits(env):
    from loradex.serving.errors import BadRequest, ContextTooLong, ModelNotFound

    eng = env["engine"]
    assert eng.resolve(model="tiny").row is None
    assert eng.resolve(model="qv8", adapter="all4").row["adapter"] == "all4"  # adapter wins
    for bad in ("nope", "qv8@9", "qv8@nosuchalias", "bad name!"):
        with pytest.raises(ModelNotFound):
            eng.resolve(model=bad)
    with pytest.raises(ContextTooLong):
        eng.generate(PROMPTS[0], max_tokens=eng.context)
    with pytest.raises(BadRequest):
        eng.generate(PROMPTS[0], max_tokens=5, temperature=3)
    with pytest.raises(BadRequest):
        eng.generate("", max_tokens=5)


def test_queue_limit(env, tiny_base_dir):
    from loradex.serving.errors import QueueFull

    eng = env["engine"]
    old = eng.config.max_queued
    eng.config.max_queued = 0
    try:
        with pytest.raises(QueueFull):
            eng.generate(PROMPTS[0], max_tokens=2)
    finally:
        eng.config.max_queued = old
