"""Per-request decoding inside a shared batch: sampling, stop strings, text deltas.

Each request keeps its own ``torch.Generator`` (seeded from its ``seed``), so
its sampled tokens do not depend on which other rows share the batch; greedy
rows (temperature 0) take the argmax.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from loradex.hub.errors import InvalidConfig

SEED_MIN, SEED_MAX = 0, 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping or refusing


@dataclass
class SamplingParams:
    """How one request decodes."""

    max_tokens: int = 16
    """New tokens at most (``max_tokens``); generation ends with finish_reason 'length' there."""
    temperature: float = 1.0
    """0 means greedy (argmax); higher is more random (``temperature``)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (``top_p``)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the stop string itself is not returned (``stop``)."""
    seed: int | None = None
    """Seed of this request's own generator; same seed, same output (``seed``)."""
    min_tokens: int = 0
    """End-of-sequence tokens are suppressed until this many tokens are generated (vLLM's ``min_tokens``)."""
    ignore_eos: bool = False
    """Never stop at end-of-sequence: generate until ``max_tokens`` or a stop string (vLLM's ``ignore_eos``)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidConfig(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidConfig(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidConfig(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidConfig(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidConfig("stop strings must not be empty")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            raise InvalidConfig(f"seed must be an integer between {SEED_MIN} and {SEED_MAX}, got {self.seed}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or so close to it that logits / temperature would overflow."""
        return self.temperature < GREEDY_BELOW

    def generator(self, device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def suppress_eos(logits: torch.Tensor, rows: list[int], eos_ids: list[int]) -> torch.Tensor:
    """``logits`` with the end-of-sequence tokens of ``rows`` set to -inf (a copy; the input is kept)."""
    if not rows or not eos_ids:
        return logits
    logits = logits.clone()
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[idx.unsqueeze(1), torch.tensor(eos_ids, dtype=torch.long, device=logits.device).unsqueeze(0)] = float("-inf")
    return logits


GREEDY_BELOW = 1e-5  # as vLLM: a temperature under this samples the argmax (1e-140 would overflow to inf)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [rows, vocab], each by its own params."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            keep = (cum - sorted_p) < p.top_p
            keep[0] = True  # the top token always stays (a top_p like 5e-324 is 0 in float32)
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generators[i])
            out[i] = int(order[choice])
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out


class TextStream:
    """Turns a growing list of token ids into safe text deltas, watching for stop strings.

    Text that could still become a stop string, or ends in an incomplete UTF-8
    character, is held back until it is decided.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0          # characters of text already emitted
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to emit, whether a stop string was hit)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            window = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (full.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.text = full[: min(hits)]
                delta = self.text[self.sent:]
                self.sent = len(self.text)
                return delta, True
        safe = len(full)
        while safe > self.sent and full[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if full[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        self.text = full
        if safe <= self.sent:
            return "", False
        delta = full[self.sent:safe]
        self.sent = safe
        return delta, False

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
