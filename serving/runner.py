"""The model forward for serving: prefill and one-token decode over a ragged batch.

The decoder layers of the loaded transformers model are used as modules (their
norms, projections, MLPs, rotary embedding), but the loop and the KV cache are
ours, so that rows of different lengths and adapters share a decode step and
new rows can join between steps (continuous batching)::

    prefill(new rows, right-padded)      decode(all rows, one token each)
    ids [n, T] -> causal attention       ids [B, 1] -> attention over the row's
    K/V written at 0..T-1                own 0..len_i, K/V written at len_i
    logits at each row's last token      logits [B, vocab]

Right padding keeps every real token at the position it has when run alone,
and the causal mask already hides the pad tokens that follow it, so a row's
prefill is the same computation as its solo run. Only the last position of each
row goes through the final norm and the LM head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from loradex.hub.errors import InvalidBase

SUPPORTED_MODEL_TYPES = ("llama",)
CAPACITY_STEP = 64


def check_supported(model) -> None:
    mtype = getattr(model.config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise InvalidBase(
            f"the batched serving engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; this base is {mtype!r}"
        )


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
    """Prefill and decode for a Llama-family ``*ForCausalLM`` (its modules, our loop)."""

    def __init__(self, model):
        check_supported(model)
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        cfg = model.config
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.device = self.embed.weight.device

    def empty_cache(self) -> KVCache:
        return KVCache([], [], torch.zeros(0, dtype=torch.long, device=self.device))

    def _attn_qkv(self, layer, x: torch.Tensor, B: int, T: int):
        attn = layer.self_attn
        q = attn.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def _finish_layer(self, layer, h: torch.Tensor, o: torch.Tensor, B: int, T: int) -> torch.Tensor:
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(last_hidden)).float()

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
        cos, sin = self.rotary(h, pos)
        cap = -(-(T + 1) // CAPACITY_STEP) * CAPACITY_STEP
        keys, values = [], []
        for layer in self.layers:
            x = layer.input_layernorm(h)
            q, k, v = self._attn_qkv(layer, x, B, T)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc = k.new_zeros(B, self.n_kv, cap, self.head_dim)
            vc = v.new_zeros(B, self.n_kv, cap, self.head_dim)
            kc[:, :, :T] = k
            vc[:, :, :T] = v
            keys.append(kc)
            values.append(vc)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                               enable_gqa=self.n_kv != self.n_heads)
            h = self._finish_layer(layer, h, o, B, T)
        last = h[torch.arange(B, device=self.device), lengths - 1]
        return self._logits(last), KVCache(keys, values, lengths)

    @torch.inference_mode()
    def decode(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        """Feed one token per row (row i at position cache.lengths[i]); returns logits [B, vocab]."""
        B = cache.rows
        pos = cache.lengths
        L = int(pos.max()) + 1
        cache.ensure_capacity(L)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        h = self.embed(ids)
        cos, sin = self.rotary(h, pos.unsqueeze(1))
        mask = (torch.arange(L, device=self.device).unsqueeze(0) <= pos.unsqueeze(1))[:, None, None, :]
        rows = torch.arange(B, device=self.device)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._attn_qkv(layer, x, B, 1)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = cache.keys[i], cache.values[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L], attn_mask=mask, scale=self.scaling,
                                               enable_gqa=self.n_kv != self.n_heads)
            h = self._finish_layer(layer, h, o, B, 1)
        cache.lengths = pos + 1
        return self._logits(h[:, 0])
