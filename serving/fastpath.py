"""The decode step of Llama-style layers in four native calls per layer (``serving/native.c``).

A decode step runs about forty small torch ops per layer (norms, projections,
LoRA updates, rotary embedding, cache writes, residuals, the MLP), each costing
microseconds of dispatch on CPU, more than the arithmetic of a 135M model's
layer. When every projection of the model is a native NF4 layer
(``LORADEX_KERNELS`` chose ``native``), a decode step instead calls, per layer::

    layer_in    rmsnorm -> q, k, v projections (+ bias, + each row's own LoRA update)
    rope_cache  q/k norms (Qwen3), rotary embedding, k and v written into the cache
    attend      attention of each row over its own cache length (or its sliding window)
    layer_out   o projection + residual -> rmsnorm -> SiLU-gated MLP + residual (LoRA on each)

The LoRA updates read the bank's stacked weights (serving/lora.py) in place;
rows without an adapter do no LoRA work, as in the torch path.

It applies to families whose layer is ``h + attn(norm(h))``, ``h + mlp(norm(h))``
with separate q/k/v projections, a SiLU-gated MLP, RMSNorm (``w * x / rms``) and a
rotary embedding over the whole head (Llama, Mistral, Qwen2, Qwen3). Anything else
(Gemma's norms, GELU and soft-capping, Phi-3's fused projections, unquantized or bitsandbytes
layers, bf16) keeps the torch path, which :meth:`Runner.decode` runs otherwise.
"""
from __future__ import annotations

import ctypes

import torch

from loradex.serving import native

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 256   # the C side keeps a row's A.x in a fixed buffer


class Proj(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int), ("k", ctypes.c_int), ("q", ctypes.c_void_p), ("absmax", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("r", ctypes.c_int)]


class Layer(ctypes.Structure):
    _fields_ = [("d", ctypes.c_int), ("nh", ctypes.c_int), ("nkv", ctypes.c_int), ("hd", ctypes.c_int),
                ("inter", ctypes.c_int), ("eps", ctypes.c_float), ("in_norm", ctypes.c_void_p),
                ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("code", ctypes.c_void_p), ("p", Proj * 7)]


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rms_weight(norm, eps: float):
    """The weight of a plain RMSNorm (``weight * x / rms(x)``) with this eps, else None."""
    name = type(norm).__name__
    if not name.endswith("RMSNorm") or "Gemma" in name:  # Gemma's is (1 + weight), computed otherwise
        return None
    w = getattr(norm, "weight", None)
    if w is None or w.dtype != torch.float32 or getattr(norm, "variance_epsilon", None) != eps:
        return None
    return w.detach()


def why_not(runner) -> str | None:
    """Why the native decode path cannot run this model (None: it can)."""
    from loradex.serving.lora import BatchedLoRALinear
    from loradex.serving.native import NF4Linear

    fam = runner.family
    if native.library() is None:
        return "native kernels unavailable"
    if fam.qkv == "fused" or fam.sandwich_norms or fam.rope_per_layer_type or fam.attn_softcap:
        return f"the {fam.label} layer differs from the Llama layout"
    if runner.device.type != "cpu":
        return "not on CPU"
    cfg = runner.model.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return "MLP activation is not SiLU"
    eps = getattr(runner.layers[0].input_layernorm, "variance_epsilon", None)
    for layer in runner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for mod in [getattr(attn, n, None) for n in PROJS[:4]] + [getattr(mlp, n, None) for n in PROJS[4:]]:
            base = mod.base if isinstance(mod, BatchedLoRALinear) else mod
            if not isinstance(base, NF4Linear):
                return "a projection is not a native NF4 layer"
        if _rms_weight(layer.input_layernorm, eps) is None or _rms_weight(layer.post_attention_layernorm, eps) is None:
            return "a norm is not a plain fp32 RMSNorm"
        if fam.qk_norm and (_rms_weight(attn.q_norm, eps) is None or _rms_weight(attn.k_norm, eps) is None):
            return "q/k norms are not plain fp32 RMSNorms"
    return None


class NativeDecode:
    """Per-layer C structs for ``runner``'s model, rebuilt when the LoRA bank's weights move."""

    def __init__(self, runner):
        self.runner = runner
        self.lib = native.library()
        for fn in (self.lib.layer_in, self.lib.rope_cache, self.lib.attend, self.lib.layer_out):
            fn.restype = None
        P, I = ctypes.c_void_p, ctypes.c_int
        self.lib.attend.argtypes = [P, I, P, P, P, I, P, I, ctypes.c_float, P]
        self.lib.layer_in.argtypes = [P, I, P, P, P, P, P]
        self.lib.rope_cache.argtypes = [P, I, P, P, P, P, P, P, P, I, P]
        self.lib.layer_out.argtypes = [P, I, P, P, P]
        self.structs: list[Layer] = []
        self.key = None
        self.keep: list = []

    def _build(self) -> None:
        from loradex.serving.lora import BatchedLoRALinear

        r = self.runner
        eps = r.layers[0].input_layernorm.variance_epsilon
        structs, keep = [], []
        for layer in r.layers:
            attn, mlp = layer.self_attn, layer.mlp
            down = mlp.down_proj.base if isinstance(mlp.down_proj, BatchedLoRALinear) else mlp.down_proj
            s = Layer(d=r.model.config.hidden_size, nh=r.n_heads, nkv=r.n_kv, hd=r.head_dim,
                      inter=down.in_features, eps=eps)
            norms = [_rms_weight(layer.input_layernorm, eps), _rms_weight(layer.post_attention_layernorm, eps)]
            if r.family.qk_norm:
                norms += [_rms_weight(attn.q_norm, eps), _rms_weight(attn.k_norm, eps)]
            else:
                norms += [None, None]
            s.in_norm, s.post_norm, s.q_norm, s.k_norm = (_ptr(t) for t in norms)
            mods = [getattr(attn, n) for n in PROJS[:4]] + [getattr(mlp, n) for n in PROJS[4:]]
            for i, mod in enumerate(mods):
                base = mod.base if isinstance(mod, BatchedLoRALinear) else mod
                p = s.p[i]
                p.n, p.k = base.out_features, base.in_features
                p.q, p.absmax, p.bias = base.q.data_ptr(), base.absmax.data_ptr(), _ptr(base.bias)
                s.code = base.code.data_ptr()
                if isinstance(mod, BatchedLoRALinear) and mod.stack.filled:
                    A, B = mod.stack.A, mod.stack.B
                    p.A, p.B, p.r = A.data_ptr(), B.data_ptr(), A.shape[1]
                    keep += [A, B]
                else:
                    p.A = p.B = None
                    p.r = 0
            structs.append(s)
        self.structs, self.keep = structs, keep

    def usable(self, bank) -> bool:
        """Refresh the structs for the bank's current weights; False if a LoRA stack does not fit the C side."""
        key = None if bank is None else (bank.ctx.generation, bank.capacity, bank.rank,
                                         tuple(id(s.A) for s in bank.stacks.values()))
        if key != self.key or not self.structs:
            if bank is not None and (bank.rank > MAX_RANK or bank.dtype != torch.float32):
                return False
            self._build()
            self.key = key
        return True

    def slots(self, ctx, rows: int) -> torch.Tensor | None:
        plan = None if ctx is None else ctx.plan
        if plan is None:
            return None
        if plan.rows is None:
            return plan.slots.to(torch.int32).contiguous()
        out = torch.full((rows,), -1, dtype=torch.int32)
        out[plan.rows] = plan.slots.to(torch.int32)
        return out

    def run_layers(self, h: torch.Tensor, cache, pos: torch.Tensor, rope: dict, slots) -> torch.Tensor:
        """All layers of one decode step; ``h`` [B, 1, d] (updated in place and returned)."""
        r, lib = self.runner, self.lib
        native.kernels()  # thread count in step with torch's
        B = h.shape[0]
        d = h.shape[-1]
        h = h.reshape(B, d).contiguous()
        cos, sin = rope[None]
        cos = cos.reshape(B, -1).to(torch.float32).contiguous()
        sin = sin.reshape(B, -1).to(torch.float32).contiguous()
        q = torch.empty(B, r.n_heads * r.head_dim)
        k = torch.empty(B, r.n_kv * r.head_dim)
        v = torch.empty(B, r.n_kv * r.head_dim)
        o = torch.empty(B, r.n_heads * r.head_dim)
        sp = _ptr(slots)
        pos = pos.contiguous()
        for i, s in enumerate(self.structs):
            ref = ctypes.byref(s)
            kc, vc = cache.keys[i], cache.values[i]
            lib.layer_in(ref, B, h.data_ptr(), sp, q.data_ptr(), k.data_ptr(), v.data_ptr())
            lib.rope_cache(ref, B, q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                           kc.data_ptr(), vc.data_ptr(), kc.shape[2], pos.data_ptr())
            lib.attend(ref, B, q.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[2], pos.data_ptr(),
                       r.windows[i] or 0, r.scaling, o.data_ptr())
            lib.layer_out(ref, B, o.data_ptr(), h.data_ptr(), sp)
        return h.view(B, 1, d)
