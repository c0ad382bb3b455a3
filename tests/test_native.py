"""serving/native.py + serving/fastpath.py: loradex's own CPU kernels, on real NF4 weights of the tiny base.

The engine-level equality (native decode vs transformers + PEFT, per family, mixed
adapters) is in tests/test_families_engine.py (``nf4-native``).
"""
from __future__ import annotations

import pytest
import torch

from loradex.serving import native

@pytest.fixture(scope="module", params=native.supported_isas() or ["none"])
def lib(request):
    """The kernels, once per build this CPU runs (AVX2, and AVX-512 where the CPU has it): every test that
    takes this fixture runs against each build, forced with LORADEX_NATIVE_ISA."""
    import os

    saved, old = dict(native._state), os.environ.get("LORADEX_NATIVE_ISA")
    os.environ["LORADEX_NATIVE_ISA"] = request.param
    native._state.clear()
    try:
        got = native.library()
        assert got is not None, f"native kernels unavailable here: {native.status()['reason']}"
        assert native.status()["isa"] == request.param and got.native_vw() == {"avx2": 8, "avx512": 16}[request.param]
        yield got
    finally:
        if old is None:
            os.environ.pop("LORADEX_NATIVE_ISA", None)
        else:
            os.environ["LORADEX_NATIVE_ISA"] = old
        native._state.clear()
        native._state.update(saved)


@pytest.fixture
def nf4_layers(tiny_base_dir, lib):
    """(bitsandbytes 4-bit layer, its dense fp32 copy) for every projection of the tiny base in NF4."""
    from loradex.hub.loading import load_model_folder
    from loradex.serving.kernels import dense_copy, quantized_linears

    model, _, dtype = load_model_folder(tiny_base_dir, quantize="nf4", device="cpu")
    layers = quantized_linears(model)
    assert layers
    return [(m, dense_copy(m, dtype)) for m in layers.values()]


def test_nf4_layer_rebuilds_bitsandbytes_weights_bit_for_bit(nf4_layers):
    for mod, dense in nf4_layers:
        lin = native.NF4Linear.from_weight(dense.weight, mod.weight.quant_state.code, dense.bias)
        assert lin is not None
        assert torch.equal(lin.dequantize(), dense.weight)
        # half a byte per weight plus one fp32 scale per 64
        assert lin.q.numel() * 4 == dense.weight.numel() // 2 and lin.absmax.numel() * 64 == dense.weight.numel()


def test_nf4_product_equals_torch_and_rows_do_not_depend_on_their_neighbours(nf4_layers):
    torch.manual_seed(0)
    mod, dense = nf4_layers[0]
    lin = native.NF4Linear.from_weight(dense.weight, mod.weight.quant_state.code, dense.bias)
    rows = native.rows_limits()[0]
    for m in (1, 2, 3, 4, 5, 7, 8, 9, rows, rows + 5):  # the last one: dequantize + torch
        x = torch.randn(m, 1, lin.in_features)
        got = lin(x)
        assert got.shape == (m, 1, lin.out_features)
        torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(7, lin.in_features)
    batch = lin(x)
    for i in range(7):  # row i alone gives the same bits as row i among six others
        assert torch.equal(lin(x[i:i + 1])[0], batch[i])


def test_weights_that_are_not_nf4_values_are_refused_not_approximated(nf4_layers):
    mod, dense = nf4_layers[0]
    w = dense.weight.clone()
    w[0, 3] += 1e-3  # one weight off the NF4 grid
    assert native.NF4Linear.from_weight(w, mod.weight.quant_state.code) is None
    assert native.NF4Linear.from_weight(torch.randn(8, 96), mod.weight.quant_state.code) is None  # 96 % 64 != 0


def test_f32_head_shares_the_weights_and_equals_torch(lib):
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(1000, 64) * 0.05)
    head = native.F32Linear(emb)
    assert head.weight is emb  # a tied head stays tied: no copy
    for m in (1, 3, 8, native.rows_limits()[1], native.rows_limits()[1] + 1):
        x = torch.randn(m, 64)
        torch.testing.assert_close(head(x), x @ emb.T, rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 64)
    assert torch.equal(head(x[2:3])[0], head(x)[2])


def _q8_matrix(n: int, k: int) -> torch.Tensor:
    """What a GGUF Q8_0 tensor dequantizes to: per block of 32, an fp16 scale times int8 values (max 127)."""
    q = torch.randint(-127, 128, (n, k // 32, 32), dtype=torch.int32)
    q[:, :, 5] = 127
    d = (torch.rand(n, k // 32, 1) * 0.01 + 1e-4).half().float()
    return (d * q.float()).reshape(n, k).contiguous()


def test_head_weights_with_an_exact_compact_form_are_read_compact_with_the_same_bits(lib):
    torch.manual_seed(0)
    fp32 = torch.randn(1030, 96) * 0.05  # 1030 rows: the last group of four is padded
    cases = {"q8": _q8_matrix(1030, 96), "bf16": fp32.to(torch.bfloat16).float(), "fp32": fp32}
    for form, w in cases.items():
        emb = torch.nn.Parameter(w)
        head = native.F32Linear(emb)
        assert head.form == form and head.weight is emb
        ref = native.F32Linear(emb)
        ref.packed = None  # the same product over the fp32 weights
        for m in (1, 2, 5, 8, 9, native.rows_limits()[1]):
            x = torch.randn(m, 96)
            got = head(x)
            assert torch.equal(got, ref(x)), (form, m)  # bit for bit, not close
            torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)
        if form != "fp32":  # 4x / 2x fewer bytes than the fp32 matrix
            size = head.packed.numel() * head.packed.element_size()
            assert size <= w.numel() * 4 // (4 if form == "q8" else 2) + 4 * 96 * 2


def test_a_matrix_off_the_compact_grid_stays_fp32(lib):
    w = _q8_matrix(64, 64)
    w[3, 7] = w[3, 7] + 1e-7 * w[3, 7].sign()  # one weight neither scale * int8 nor a bf16
    assert native.compact(w) is None
    z = _q8_matrix(8, 64)
    z[2, :32] = 0.0
    z[2, 4] = -0.0  # a zero block holding -0.0 would come back as +0.0: refused
    assert native.compact(z) is None or native.compact(z)[0] == "bf16"
    assert native.compact(torch.randn(4, 60)) is None  # K % 8 != 0


def test_the_default_base_head_is_read_as_q8(smollm_folder, lib):
    """The shipped GGUF stores token_embd as Q8_0: the converted fp32 head is exactly Q8, a quarter of the bytes."""
    from safetensors import safe_open

    for f in sorted(smollm_folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            names = [n for n in sf.keys() if n.endswith("embed_tokens.weight")]
            if names:
                emb = sf.get_tensor(names[0]).float().contiguous()
                break
    got = native.compact(emb)
    assert got is not None and got[0] == "q8"


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count(nf4_layers, torch_threads):
    torch.manual_seed(0)
    mod, dense = nf4_layers[-1]
    lin = native.NF4Linear.from_weight(dense.weight, mod.weight.quant_state.code, dense.bias)
    head = native.F32Linear(torch.nn.Parameter(_q8_matrix(1030, lin.in_features)))
    xs = [torch.randn(m, lin.in_features) for m in (1, 2, 8, 50)]
    runs = []
    for threads in (1, 3, 2):
        torch_threads(threads)
        runs.append([(lin(x), head(x)) for x in xs])
    for other in runs[1:]:
        for (a, b), (c, d) in zip(runs[0], other):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_a_forked_child_computes_without_the_parents_workers(nf4_layers, torch_threads):
    import multiprocessing as mp

    mod, dense = nf4_layers[0]
    lin = native.NF4Linear.from_weight(dense.weight, mod.weight.quant_state.code, dense.bias)
    torch_threads(2)
    x = torch.randn(8, lin.in_features)
    want = lin(x)  # the pool now has a worker thread, which a fork does not copy

    def child(q):
        q.put(bool(torch.equal(lin(x), want)))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=child, args=(q,))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0 and q.get(timeout=5) is True


def test_build_failure_is_reported_and_serving_keeps_torch(monkeypatch, tmp_path):
    saved = dict(native._state)
    try:
        for env, want in (({"LORADEX_NATIVE": "0"}, "LORADEX_NATIVE=0"),
                          ({"CC": "/bin/false", "LORADEX_NATIVE_CACHE": str(tmp_path)}, "could not build")):
            native._state.clear()
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            st = native.status()
            assert not st["available"] and want in st["reason"]
            assert native.NF4Linear.from_weight(torch.zeros(4, 64), torch.linspace(-1, 1, 16)) is None
            for k in env:
                monkeypatch.delenv(k)
    finally:
        native._state.clear()
        native._state.update(saved)


def test_an_unwritable_cache_folder_builds_in_the_temp_folder(monkeypatch, tmp_path, lib):
    import tempfile

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    saved = dict(native._state)
    try:
        native._state.clear()
        monkeypatch.setenv("LORADEX_NATIVE_CACHE", str(blocker / "native"))
        st = native.status()
        assert st["available"], st["reason"]
        assert st["path"].startswith(tempfile.gettempdir())
    finally:
        native._state.clear()
        native._state.update(saved)


def test_forced_native_without_the_library_is_a_clear_error(monkeypatch, tiny_base_dir):
    from loradex.hub.errors import InvalidConfig
    from loradex.hub.loading import load_model_folder
    from loradex.serving.kernels import choose

    model, device, dtype = load_model_folder(tiny_base_dir, quantize="nf4", device="cpu")
    saved = dict(native._state)
    try:
        native._state.clear()
        monkeypatch.setenv("LORADEX_NATIVE", "0")
        with pytest.raises(InvalidConfig, match=r"LORADEX_KERNELS=native: the native kernels are not available "
                                                r"here \(LORADEX_NATIVE=0\)"):
            choose(model, quantize="nf4", dtype=dtype, device=device, mode="native")
    finally:
        native._state.clear()
        native._state.update(saved)


def test_decode_path_equals_the_torch_path_with_mixed_adapters(tiny_base_dir, lib):
    """The runner's native decode step against its own torch decode step, same weights, rows with and without
    adapters, a few steps: logits agree closely and every greedy token is the same."""
    from loradex.hub.loading import load_model_folder
    from loradex.serving.kernels import choose
    from loradex.serving.lora import AdapterWeights, LoRABank
    from loradex.serving.runner import Runner

    torch.manual_seed(0)
    model, device, dtype = load_model_folder(tiny_base_dir, quantize="nf4", device="cpu")
    assert choose(model, quantize="nf4", dtype=dtype, device=device, mode="native")["linear"] == "native"
    bank = LoRABank(model, torch.float32, "cpu")
    cfg = model.config
    shapes = {f"model.layers.{i}.{name}": model.get_submodule(f"model.layers.{i}.{name}")
              for i in range(cfg.num_hidden_layers) for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    shapes = {k: (m.in_features, m.out_features) for k, m in shapes.items()}
    for slot in range(2):
        mods = {k: (torch.randn(8, i) * 0.3, torch.randn(o, 8) * 0.3) for k, (i, o) in shapes.items()}
        bank.write(slot, AdapterWeights(mods, 8))
    runner = Runner(model)
    runner.bank = bank
    prompts = [[1, 200, 300, 400, 500], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18]]

    def steps(native_on: bool, slots=(0, -1, 1), n: int = 6):
        runner._native = None if native_on else False
        bank.ctx.set_rows(list(slots))
        logits, cache = runner.prefill(prompts)
        out, tok = [], logits.argmax(-1).tolist()
        for _ in range(n):
            lg = runner.decode(tok, cache)
            out.append(lg)
            tok = lg.argmax(-1).tolist()
        return torch.stack(out)

    fast, slow = steps(True), steps(False)
    assert runner.native_reason is None
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    # the adapters matter (so the agreement covers the LoRA updates), and the bare row is the bare base
    bare = steps(True, slots=(-1, -1, -1))
    assert not torch.allclose(fast[:, 0], bare[:, 0], atol=1e-3) and not torch.allclose(fast[:, 2], bare[:, 2], atol=1e-3)
    torch.testing.assert_close(fast[:, 1], bare[:, 1], rtol=1e-5, atol=1e-5)
