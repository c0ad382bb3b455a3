"""The model forward for serving: prefill and one-token decode over a ragged batch.

The decoder layers of the loaded transformers model are used as modules (their
embedding, norms, projections, MLPs, q/k norms, rotary embedding), but the loop
and the KV cache are ours, so that rows of different lengths and adapters share a
decode step and new rows can join between steps (continuous batching)::

    prefill(new rows, right-padded)      decode(all rows, one token each)
    ids [n, T] -> causal attention       ids [B, 1] -> attention over the row's
    K/V written at 0..T-1                own 0..len_i, K/V written at len_i
    logits at each row's last token      logits [B, vocab]

Right padding keeps every real token at the position it has when run alone,
and the causal mask already hides the pad tokens that follow it, so a row's
prefill is the same computation as its solo run. Only the last position of each
row goes through the final norm and the LM head.

One loop serves every family in ``serving/families.py``; that table says what
differs (fused qkv, q/k norms, Gemma's sandwich norms, sliding windows, per-layer
rope, soft-capping). Sliding-window layers keep every key in the cache and mask
the old ones out (a query at i sees keys i-W < j <= i, as transformers does).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from loradex.serving.families import FAMILIES, family_of, layer_rope_keys, layer_windows


def native_max_rows() -> int:
    from loradex.serving.native import MAX_ROWS

    return MAX_ROWS

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
CAPACITY_STEP = 64


def check_supported(model) -> None:
    """InvalidBase (one line, naming the supported model types) unless the engine runs this model."""
    family_of(model.config)


class KVCache:
    """K/V of the rows in the running batch, per layer: [rows, kv_heads, capacity, head_dim]."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor):
        self.keys = keys
        self.values = values
        self.lengths = lengths  # LongTensor [rows]: tokens held per row

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def _resize(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                n, h, c, d = t.shape
                if c == capacity:
                    continue
                new = t.new_zeros(n, h, capacity, d)
                keep = min(c, capacity)
                new[:, :, :keep] = t[:, :, :keep]
                store[i] = new

    def ensure_capacity(self, needed: int) -> None:
        if needed > self.capacity:
            self._resize(-(-needed // CAPACITY_STEP) * CAPACITY_STEP)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished or cancelled requests)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        self.lengths = self.lengths.index_select(0, idx)
        if rows:
            self._resize(-(-int(self.lengths.max()) // CAPACITY_STEP) * CAPACITY_STEP)

    def extend(self, other: "KVCache") -> None:
        """Append ``other``'s rows after this cache's rows."""
        if self.rows == 0:
            self.keys, self.values, self.lengths = other.keys, other.values, other.lengths
            return
        cap = max(self.capacity, other.capacity)
        self.ensure_capacity(cap)
        other.ensure_capacity(cap)
        self.keys = [torch.cat([a, b]) for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([a, b]) for a, b in zip(self.values, other.values)]
        self.lengths = torch.cat([self.lengths, other.lengths])


class Runner:
    """Prefill and decode for a ``*ForCausalLM`` of a family in serving/families.py (its modules, our loop)."""

    def __init__(self, model):
        cfg = model.config
        self.family = family_of(cfg)
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.device = self.embed.weight.device
        n = len(self.layers)
        self.windows = layer_windows(self.family, cfg, n)
        self.rope_keys = layer_rope_keys(self.family, cfg, n)
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None) if self.family.attn_softcap else None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        # the modeling file's own rope application (Phi-3's rotates only part of each head)
        self.apply_rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self.bank = None       # the LoRA bank over this model, when one serves adapters (set by its owner)
        self._native = None    # serving/fastpath.NativeDecode, once the model's layers qualify
        self.native_reason: str | None = None

    def native_decode(self):
        """The native decode path (serving/fastpath.py) when this model's layers can take it, else None."""
        from loradex.serving.fastpath import NativeDecode, why_not

        if self._native is None:
            self.native_reason = why_not(self)
            self._native = NativeDecode(self) if self.native_reason is None else False
        return self._native or None

    @property
    def lm_head(self):
        return self.model.lm_head

    def empty_cache(self) -> KVCache:
        return KVCache([], [], torch.zeros(0, dtype=torch.long, device=self.device))

    def _rope(self, h: torch.Tensor, pos: torch.Tensor) -> dict:
        """{rope key: (cos, sin)} for the positions ``pos`` [B, T]."""
        if self.family.rope_per_layer_type:
            return {key: self.rotary(h, pos, key) for key in set(self.rope_keys)}
        return {None: self.rotary(h, pos)}

    def _attn_qkv(self, layer, x: torch.Tensor, B: int, T: int):
        attn = layer.self_attn
        if self.family.qkv == "fused":
            qkv = attn.qkv_proj(x)
            nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        if self.family.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q [B, H, T, d] over k/v [B, kv, L, d]; ``mask`` (bool, True = visible) or None = causal."""
        gqa = self.n_kv != self.n_heads
        if self.attn_softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.scaling, enable_gqa=gqa)
        # soft-capping (Gemma 2) happens between q.k and softmax, where SDPA offers no hook
        if gqa:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        if mask is None:
            T, L = q.shape[2], k.shape[2]
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def _finish_layer(self, layer, h: torch.Tensor, o: torch.Tensor, B: int, T: int) -> torch.Tensor:
        a = layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        if self.family.sandwich_norms:
            h = h + layer.post_attention_layernorm(a)
            return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = h + a
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        # looked up each time: the LoRA bank wraps lm_head when an adapter that targets it is loaded
        logits = self.lm_head(self.norm(last_hidden)).float()
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache]:
        """Run new rows' prompts; returns (logits at each last token [n, vocab], their cache)."""
        B = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        T = int(lengths.max())
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        pos = torch.arange(T, device=self.device).unsqueeze(0).expand(B, T)
        h = self.embed(ids)
        rope = self._rope(h, pos)
        qi = torch.arange(T, device=self.device)
        masks = {w: None if w is None or w >= T else
                 (qi[None, :] <= qi[:, None]) & (qi[None, :] > qi[:, None] - w) for w in set(self.windows)}
        cap = -(-(T + 1) // CAPACITY_STEP) * CAPACITY_STEP
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._attn_qkv(layer, x, B, T)
            q, k = self.apply_rope(q, k, *rope[self.rope_keys[i]])
            kc = k.new_zeros(B, self.n_kv, cap, self.head_dim)
            vc = v.new_zeros(B, self.n_kv, cap, self.head_dim)
            kc[:, :, :T] = k
            vc[:, :, :T] = v
            keys.append(kc)
            values.append(vc)
            o = self._attend(q, k, v, masks[self.windows[i]])
            h = self._finish_layer(layer, h, o, B, T)
        last = h[torch.arange(B, device=self.device), lengths - 1]
        return self._logits(last), KVCache(keys, values, lengths)

    def _native_fits(self, h, rope, cache) -> bool:
        cos = rope.get(None, (None,))[0]
        return (h.dtype == torch.float32 and cos is not None and cos.shape[-1] == self.head_dim
                and all(k.dtype == torch.float32 and k.is_contiguous() for k in cache.keys)
                and all(v.is_contiguous() for v in cache.values))

    @torch.inference_mode()
    def decode(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        """Feed one token per row (row i at position cache.lengths[i]); returns logits [B, vocab]."""
        B = cache.rows
        pos = cache.lengths
        L = int(pos.max()) + 1
        cache.ensure_capacity(L)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        h = self.embed(ids)
        rope = self._rope(h, pos.unsqueeze(1))
        fast = self.native_decode() if B <= native_max_rows() else None
        if fast is not None and self._native_fits(h, rope, cache) and fast.usable(self.bank):
            h = fast.run_layers(h, cache, pos, rope, fast.slots(self.bank and self.bank.ctx, B))
            cache.lengths = pos + 1
            return self._logits(h[:, 0])
        kj = torch.arange(L, device=self.device).unsqueeze(0)
        seen = kj <= pos.unsqueeze(1)  # [B, L]: the row's own tokens so far
        masks = {w: (seen if w is None else seen & (kj > pos.unsqueeze(1) - w))[:, None, None, :]
                 for w in set(self.windows)}
        rows = torch.arange(B, device=self.device)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._attn_qkv(layer, x, B, 1)
            q, k = self.apply_rope(q, k, *rope[self.rope_keys[i]])
            kc, vc = cache.keys[i], cache.values[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            o = self._attend(q, kc[:, :, :L], vc[:, :, :L], masks[self.windows[i]])
            h = self._finish_layer(layer, h, o, B, 1)
        cache.lengths = pos + 1
        return self._logits(h[:, 0])
