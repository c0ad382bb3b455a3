"""The benchmark harness: statistics, result lines, JSON, the adapter generator, and a smoke run.

No timing assertions: the smoke run only proves every benchmark runs end to end
on the tiny model (real engine, real PEFT, real TRL, real `loradex serve`) and
reports its figures under the stable keys.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# benchmarks/ is run from the repository root (`python -m benchmarks.run`) and is
# not an installed package, so make the root importable here.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.common import Metric, Report, interleave, percentile, ratios, summarize  # noqa: E402
from loradex.hub.errors import InvalidConfig  # noqa: E402

# Keys later runs compare by: renaming one breaks every comparison, so they are pinned here.
STABLE_KEYS = {
    "catalog": ["catalog.register_ms_p50", "catalog.list_ms_p50", "catalog.show_ms_p50"],
    "decode_bound": ["decode.mem_bandwidth_gbs", "decode.bytes_per_token_mb", "decode.bound_tokens_per_s",
                     "decode.engine_tokens_per_s", "decode.hf_tokens_per_s", "decode.fraction_of_bound"],
    "serving_mixed": ["serving.mixed_tokens_per_s", "serving.swap_tokens_per_s", "serving.base_tokens_per_s",
                      "serving.base_loaded_tokens_per_s", "serving.mixed_p50_ms", "serving.mixed_p95_ms",
                      "serving.mixed_over_base", "serving.mixed_over_swap", "serving.base_loaded_over_base"],
    "scaling": ["scaling.1_lru_tokens_per_s", "scaling.3_lru_tokens_per_s", "scaling.3_over_1",
                "scaling.3_over_1_resident"],
    "cold_load": ["cold_load.ms", "cold_load.warm_ttft_ms", "cold_load.cold_ttft_ms"],
    "http": ["http.tokens_per_s", "http.inprocess_tokens_per_s", "http.overhead_ratio", "http.p50_ms"],
    "eval_many": ["eval_many.one_s", "eval_many.many_s", "eval_many.many_over_one",
                  "eval_many.generate_many_over_one", "eval_many.invariant_over_normal",
                  "eval_many.generate_invariant_over_normal"],
    "training": ["training.loradex_steps_per_s", "training.trl_steps_per_s", "training.loradex_over_trl"],
}
TARGETS = {"serving.mixed_over_base": (">=", 0.8), "serving.mixed_over_swap": (">=", 4.0),
           "serving.base_loaded_over_base": (">=", 0.95), "scaling.3_over_1": (">=", 0.9),
           "cold_load.ms": ("<=", 50.0), "training.loradex_over_trl": (">=", 1.0)}


# -- statistics and lines ----------------------------------------------------------------
def test_percentile_interpolates_and_refuses_empty():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([10.0], 95) == 10.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_median_and_spread():
    s = summarize([2.0, 4.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 3)
    assert s["spread_pct"] == pytest.approx(200 / 3)
    assert summarize([])["median"] is None


def test_ratios_pair_repetitions_and_skip_zero_denominators():
    assert ratios([2.0, 9.0, 4.0], [1.0, 0.0, 8.0]) == [2.0, 0.5]


def test_interleave_warms_up_then_rotates_the_order():
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    out = interleave(cases, reps=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}
    assert out["a"] == [4, 9, 11]  # warm-up results are dropped


def test_metric_verdicts_and_line():
    ok = Metric("x.ratio", [0.7, 0.9, 0.85], "x", 0.8, ">=", "a/c")
    assert ok.value == 0.85 and ok.passed is True
    line = ok.line()
    assert line.startswith("x.ratio") and "target >= 0.800" in line and "PASS" in line and "n=3" in line
    miss = Metric("y.ms", [60.0], "ms", 50.0, "<=")
    assert miss.passed is False and "MISS" in miss.line()
    info = Metric("z.tok", [1.0, 2.0], "tok/s")
    assert info.passed is None and "target -" in info.line()
    assert Metric("e.none", [], "x", 1.0, ">=").passed is None
    noisy = Metric("n.ms", [-200.0, 10.0, 250.0], "ms", 50.0, "<=")
    assert noisy.noisy and "NOISY" in noisy.line() and noisy.to_dict()["noisy"] is True
    assert not ok.noisy


def test_metric_refuses_bad_targets():
    with pytest.raises(ValueError, match="op"):
        Metric("k", [1.0], "x", 1.0, ">")
    with pytest.raises(ValueError, match="together"):
        Metric("k", [1.0], "x", 1.0, None)


def test_report_rejects_a_key_twice_and_writes_stable_json(tmp_path, capsys):
    report = Report()
    report.add(Metric("b.second", [2.0], "x"))
    report.add(Metric("a.first", [1.0, 3.0], "x", 1.5, ">="))
    with pytest.raises(ValueError, match="twice"):
        report.add(Metric("a.first", [1.0], "x"))
    out = common.write_json(tmp_path / "r" / "out.json", report.to_dict())
    text = out.read_text()
    data = json.loads(text)
    assert list(data["figures"]) == ["a.first", "b.second"]
    assert data["metrics"]["a.first"]["samples"] == [1.0, 3.0]
    assert data["metrics"]["a.first"]["pass"] is True and data["metrics"]["a.first"]["value"] == 2.0
    assert text == common.write_json(tmp_path / "again.json", json.loads(text)).read_text()
    assert "a.first" in capsys.readouterr().out


def test_compare_lines_show_change():
    lines = common.compare_lines({"figures": {"k": 2.0, "gone": 1.0}}, {"figures": {"k": 3.0, "new": 1.0}})
    assert len(lines) == 1 and lines[0].startswith("k") and "+50.0%" in lines[0]


# -- configuration errors name the flag --------------------------------------------------------
def test_run_config_errors_name_the_flag(tmp_path):
    from benchmarks.run import RunConfig, main

    with pytest.raises(InvalidConfig, match="--only nope"):
        RunConfig(only=["nope"])
    with pytest.raises(InvalidConfig, match="--quantize"):
        RunConfig(quantize="fp8")
    with pytest.raises(InvalidConfig, match="--base-dir"):
        RunConfig(base_dir=tmp_path)
    with pytest.raises(InvalidConfig, match="--reps"):
        RunConfig(reps=0)
    assert RunConfig(preset="quick", reps=5).sizes.reps == 5
    with pytest.raises(InvalidConfig, match="--compare"):
        RunConfig(compare=tmp_path / "missing.json")
    assert main(["--only", "nope"]) == 2


def test_sizes_refuse_nonsense():
    from benchmarks.workspace import Sizes

    with pytest.raises(InvalidConfig, match="reps"):
        Sizes(reps=0)
    with pytest.raises(InvalidConfig, match="train_steps"):
        Sizes(train_steps=1)


# -- the adapter generator and the bytes-per-token count -------------------------------------
def test_random_adapter_registers_and_loads_with_peft(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.workspace import make_random_adapter
    from loradex.hub.registry import register_adapter

    folder = make_random_adapter(tiny_base, tmp_path / "a", rank=4, seed=1)
    row = register_adapter(catalog, store, folder, "gen", base="tiny")
    assert row["rank"] == 4 and row["target_modules"] == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(folder))(ids).logits
    assert not torch.allclose(before, after)  # not a no-op
    again = make_random_adapter(tiny_base, tmp_path / "b", rank=4, seed=1)
    assert (again / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_bytes_per_token_counts_tied_lm_head_once(tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.decode_bound import weight_bytes_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    got = weight_bytes_per_token(model)
    emb = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding matrix appears once
    assert got["lm_head"] == emb.numel() * 4
    assert got["embedding"] == emb.shape[1] * 4  # one row read per token
    assert got["total"] - got["embedding"] - got.get("other", 0) == params * 4


def test_a_native_head_over_a_compact_copy_counts_the_copy(tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.decode_bound import weight_bytes_per_token
    from loradex.serving import native

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # bf16 values: the native head reads a bf16 copy, half the bytes
        emb.copy_(emb.to(torch.bfloat16).float())
    assert native.library() is not None, native.status()["reason"]
    model.lm_head = native.F32Linear(emb)
    assert model.lm_head.form == "bf16"
    got = weight_bytes_per_token(model)
    assert got["lm_head"] == model.lm_head.packed.numel() * 2 < emb.numel() * 4
    assert got["embedding"] == emb.shape[1] * 4


# -- the smoke run: every benchmark, tiny sizes, one process ---------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tiny_base_dir, tmp_path_factory):
    from benchmarks.run import RunConfig, run_benchmarks

    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    config = RunConfig(preset="smoke", base_dir=tiny_base_dir, out=out,
                       cache_dir=tmp_path_factory.mktemp("bench-cache"))
    payload = run_benchmarks(config, Report())
    return payload, out


@pytest.mark.parametrize("name", list(STABLE_KEYS))
def test_each_benchmark_runs_and_reports_its_keys(smoke_run, name):
    payload, _ = smoke_run
    entry = payload["benchmarks"][name]
    assert entry["status"] == "ok", entry.get("traceback")
    for key in STABLE_KEYS[name]:
        metric = payload["metrics"][key]
        assert metric["n"] >= 1 and metric["value"] is not None, key
        assert metric["value"] == payload["figures"][key]


def test_smoke_run_writes_json_with_machine_info_and_targets(smoke_run):
    payload, out = smoke_run
    on_disk = json.loads(out.read_text())
    assert on_disk["figures"] == payload["figures"]
    machine = on_disk["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] == 1 and machine["versions"]["torch"]
    assert on_disk["settings"]["preset"] == "smoke" and on_disk["settings"]["base"]
    for key, (op, target) in TARGETS.items():
        metric = on_disk["metrics"][key]
        assert (metric["op"], metric["target"]) == (op, target), key
        assert isinstance(metric["pass"], bool)
    # tokens were really generated in every serving case, adapters really loaded once each
    details = on_disk["benchmarks"]["serving_mixed"]["details"]
    assert all(n > 0 for counts in details["tokens"].values() for n in counts)
    assert details["adapter_loads"] == len(details["adapters"])


LLAMACPP_KEYS = ["llamacpp.engine_tokens_per_s", "llamacpp.llamacpp_tokens_per_s", "llamacpp.per_stream_ratio",
                 "llamacpp.engine_ttft_ms", "llamacpp.llamacpp_ttft_ms", "llamacpp.engine_8_adapters_tokens_per_s",
                 "llamacpp.llamacpp_8_sequential_tokens_per_s", "llamacpp.eight_adapter_ratio"]


def test_llamacpp_rows_or_a_note_saying_why_not(smoke_run):
    """With llama-cpp-python: side-by-side figures with their targets; without: no figures, not a failure."""
    from benchmarks.llamacpp import available

    payload, _ = smoke_run
    entry = payload["benchmarks"]["llamacpp"]
    assert entry["status"] == "ok", entry.get("traceback")
    if not available():
        assert entry["details"] == {"skipped": "llama-cpp-python is not installed"}
        assert not [k for k in payload["metrics"] if k.startswith("llamacpp.")]
        return
    for key in LLAMACPP_KEYS:
        assert payload["metrics"][key]["value"] > 0, key
    assert (payload["metrics"]["llamacpp.per_stream_ratio"]["target"], payload["metrics"]["llamacpp.eight_adapter_ratio"]
            ["target"]) == (0.7, 4.0)
    chosen = entry["details"]["kernels"]["default"]
    assert chosen["linear"] in ("bnb", "dense", "native")
    # the bitsandbytes row (before the kernel choice) is there exactly when the choice changed something
    changed = chosen["linear"] in ("dense", "native") or chosen.get("lm_head") in ("fp16", "native")
    assert ("llamacpp.per_stream_bnb_ratio" in payload["metrics"]) == changed


def test_bench_gpu_refuses_without_cuda_or_base(tmp_path, capsys, monkeypatch):
    import torch

    from benchmarks import gpu

    monkeypatch.setenv("LORADEX_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert gpu.vllm_command() == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    if torch.cuda.is_available():
        assert gpu.main(["--base-dir", str(tmp_path)]) == 2
        assert "give a local model folder" in capsys.readouterr().err
    else:
        assert gpu.main(["--base-dir", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_workspace_is_isolated_and_cleaned_up(tiny_base_dir, tmp_path, monkeypatch):
    import os

    from benchmarks.workspace import PRESETS, close_workspace, open_workspace

    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "user-home"))
    ws = open_workspace(sizes=PRESETS["smoke"], base_dir=tiny_base_dir, base_name="tiny", cache_dir=tmp_path / "c")
    assert os.environ["LORADEX_HOME"] == str(ws.settings.home) != str(tmp_path / "user-home")
    names = ws.register_adapters("w", 2)
    with ws.catalog() as cat:
        assert [r["adapter"] for r in cat.query("SELECT adapter FROM adapter_versions ORDER BY adapter")] == names
    close_workspace(ws)
    assert os.environ["LORADEX_HOME"] == str(tmp_path / "user-home")
    assert not ws.root.exists()
    assert not (tmp_path / "user-home").exists()  # the user's catalog was never created or touched
