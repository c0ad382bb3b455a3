"""Batched multi-adapter LoRA: many adapters in one forward pass, no PEFT at serve time.

Every targeted base ``Linear`` stays as it is (fp32, bf16, or a bitsandbytes
4-/8-bit layer) and is wrapped by :class:`BatchedLoRALinear`, which adds the
low-rank update of each row's own adapter. Attention and MLP projections of every
served family are alike here, fused ones too (Phi-3's ``qkv_proj`` and
``gate_up_proj`` take one A/B pair over the whole fused output, as PEFT trains them)::

    x [rows, T, in] --base--> y [rows, T, out]
       |
       | rows that carry an adapter only (bare-base rows do no LoRA work)
       v
    gather A[slot_i]: [n, r, in]    gather B[slot_i] * scale_i: [n, out, r]
    d = bmm(bmm(x_rows, A^T), B^T)  -> [n, T, out];  y[rows] += d

Adapters live in slots of stacked, zero-padded buffers (one pair per wrapped
module, shared by all adapters), so a mixed batch costs two ``bmm`` per module
whatever the mix. The scale (alpha/r, or alpha/sqrt(r) for rsLoRA) is folded
into B when the adapter is written, and padding ranks with zeros adds exact
zeros. Weights go straight from ``adapter_model.safetensors`` into the slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loradex.hub.errors import InvalidAdapter
from loradex.hub.peft_format import WEIGHTS, group_tensors, module_scale, read_config, unbatchable


@dataclass
class AdapterWeights:
    """One adapter read from disk: per module (A [r, in], B*scale [out, r])."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


def read_adapter(folder: str | Path, dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """Read a (validated, sha256-verified) PEFT LoRA folder into scaled A/B pairs."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_config(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{folder}: cannot read the adapter ({exc})") from None
    if unbatchable(cfg):
        raise InvalidAdapter(f"{folder}: {', '.join(unbatchable(cfg))}: cannot be served in a batch")
    parts, other = group_tensors(tensors)
    if other:
        raise InvalidAdapter(f"{WEIGHTS}: tensor {other[0]!r} is not a LoRA A/B weight")
    for name, got in parts.items():
        if any(p.startswith("lora_embedding") for p in got):
            raise InvalidAdapter(
                f"{WEIGHTS}: {name} is an embedding LoRA; the batched server applies LoRA to "
                f"Linear layers only (merge this adapter with `loradex merge` and serve the merged model)"
            )
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sums: list[torch.Tensor] = []  # per module, A's and scaled B's sums in fp64: finite exactly when every weight is
    max_r = 0
    for name, got in parts.items():
        if "lora_A" not in got or "lora_B" not in got:
            raise InvalidAdapter(f"{WEIGHTS}: {name} has only one of lora_A/lora_B")
        a, b = got["lora_A"], got["lora_B"]
        r = a.shape[0]
        cfg_r, _, scale = module_scale({"r": r, **cfg}, name)
        if r != cfg_r:
            raise InvalidAdapter(f"{WEIGHTS}: {name} has rank {r}, which its config does not say")
        scaled = (b.float() * scale).to(dtype)
        # one reduction per tensor (NaN and inf propagate; fp32 values cannot overflow an fp64 sum), checked once below
        sums += [torch.sum(a, dtype=torch.float64), torch.sum(scaled, dtype=torch.float64)]
        modules[name] = (a.to(dtype).contiguous(), scaled.contiguous())
        max_r = max(max_r, r)
    if not modules:
        raise InvalidAdapter(f"{folder}: the adapter holds no LoRA weights")
    finite = torch.isfinite(torch.stack(sums)).view(-1, 2).all(dim=1).tolist()
    if not all(finite):
        name = list(modules)[finite.index(False)]
        scale = module_scale({"r": modules[name][0].shape[0], **cfg}, name)[2]
        raise InvalidAdapter(f"{WEIGHTS}: {name}: its weights times its scale ({scale:g}) are not finite in "
                             f"{dtype}; refusing to serve an adapter that can only produce NaN")
    return AdapterWeights(modules=modules, rank=max_r)


@dataclass
class RowPlan:
    """Which rows of the current forward carry which adapter slot."""

    rows: torch.Tensor | None      # LongTensor of row indices with an adapter (None: every row)
    slots: torch.Tensor            # LongTensor, one slot per adapter row
    uniform: int | None            # the slot when every row uses the same one
    key: tuple = ()                # identifies the gathered weights this plan needs


@dataclass
class LoRAContext:
    """Shared by all wrapped modules: the plan of the forward in progress."""

    plan: RowPlan | None = None
    generation: int = 0            # bumped whenever a slot's weights change
    _last: RowPlan | None = None

    def set_rows(self, slots: list[int]) -> None:
        """``slots[i]`` is row i's adapter slot, or -1 for the bare base.

        Consecutive decode steps of an unchanged batch get the same plan, so each
        module reuses the A/B it gathered for that batch instead of gathering again.
        """
        key = (self.generation, tuple(slots))
        if self._last is not None and self._last.key == key:
            self.plan = self._last
            return
        with_adapter = [i for i, s in enumerate(slots) if s >= 0]
        if not with_adapter:
            self.plan = None
            return
        used = {slots[i] for i in with_adapter}
        if len(with_adapter) == len(slots):
            uniform = next(iter(used)) if len(used) == 1 else None
            plan = RowPlan(rows=None, slots=torch.tensor(slots, dtype=torch.long), uniform=uniform, key=key)
        else:
            plan = RowPlan(rows=torch.tensor(with_adapter, dtype=torch.long),
                           slots=torch.tensor([slots[i] for i in with_adapter], dtype=torch.long), uniform=None,
                           key=key)
        self.plan = self._last = plan

    def clear(self) -> None:
        self.plan = None


@dataclass
class Stack:
    """Stacked LoRA weights for one module: A [slots, r, in], B [slots, out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    filled: set[int] = field(default_factory=set)
    gathered_key: tuple | None = None          # plan key of the tensors below
    gathered: tuple | None = None              # (A^T [n, in, r], B^T [n, r, out]) for that plan's rows


class BatchedLoRALinear(nn.Module):
    """A base Linear plus each row's own LoRA update (see the module docstring)."""

    def __init__(self, base: nn.Module, stack: Stack, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.stack = stack
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.ctx.plan
        if plan is None or not self.stack.filled:
            return y
        A, B = self.stack.A, self.stack.B
        if plan.uniform is not None:
            if plan.uniform not in self.stack.filled:
                return y
            return y + (x @ A[plan.uniform].transpose(0, 1)) @ B[plan.uniform].transpose(0, 1)
        stack = self.stack
        if stack.gathered_key != plan.key:
            stack.gathered = (A.index_select(0, plan.slots).transpose(1, 2).contiguous(),
                              B.index_select(0, plan.slots).transpose(1, 2).contiguous())
            stack.gathered_key = plan.key
        a_t, b_t = stack.gathered
        xs = x if plan.rows is None else x.index_select(0, plan.rows)
        d = torch.bmm(torch.bmm(xs, a_t), b_t)
        if plan.rows is None:
            return y.add_(d)
        return y.index_add_(0, plan.rows, d)


class LoRABank:
    """Slots of stacked adapter weights over one model; wraps modules on first use."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: str | torch.device, capacity: int = 4):
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = max(1, capacity)
        self.rank = 0
        self.ctx = LoRAContext()
        self.stacks: dict[str, Stack] = {}

    # -- shape management ---------------------------------------------------------
    def _layer_shape(self, name: str) -> tuple[int, int]:
        try:
            mod = self.model.get_submodule(name)
        except AttributeError:
            raise InvalidAdapter(f"the base model has no module {name!r}") from None
        if isinstance(mod, BatchedLoRALinear):
            mod = mod.base
        out_f, in_f = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
        if out_f is None or in_f is None:
            raise InvalidAdapter(f"{name} is a {type(mod).__name__}, not a Linear layer; cannot apply LoRA to it")
        return out_f, in_f

    def _stack(self, name: str) -> Stack:
        stack = self.stacks.get(name)
        if stack is not None:
            return stack
        out_f, in_f = self._layer_shape(name)
        r = max(self.rank, 1)
        stack = Stack(A=torch.zeros(self.capacity, r, in_f, dtype=self.dtype, device=self.device),
                      B=torch.zeros(self.capacity, out_f, r, dtype=self.dtype, device=self.device))
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, BatchedLoRALinear(getattr(parent, child), stack, self.ctx))
        self.stacks[name] = stack
        return stack

    def _grow(self, capacity: int, rank: int) -> None:
        """Re-pad every stack to ``capacity`` slots and rank ``rank`` (rare: on a bigger adapter)."""
        for stack in self.stacks.values():
            n, r, in_f = stack.A.shape
            out_f = stack.B.shape[1]
            if capacity == n and rank == r:
                continue
            A = torch.zeros(capacity, rank, in_f, dtype=self.dtype, device=self.device)
            B = torch.zeros(capacity, out_f, rank, dtype=self.dtype, device=self.device)
            A[:n, :r] = stack.A
            B[:n, :, :r] = stack.B
            stack.A, stack.B = A, B
        self.capacity, self.rank = capacity, rank

    def ensure_slots(self, n: int) -> None:
        if n > self.capacity:
            self._grow(max(n, self.capacity * 2), max(self.rank, 1))

    # -- slots ---------------------------------------------------------------
    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Put an adapter in ``slot`` (overwriting whatever was there)."""
        for name in weights.modules:
            self._layer_shape(name)  # refuse before touching anything
        self.ensure_slots(slot + 1)
        if weights.rank > self.rank:
            self._grow(self.capacity, weights.rank)
        self.clear(slot)
        self.ctx.generation += 1
        for name, (a, b) in weights.modules.items():
            stack = self._stack(name)
            r = a.shape[0]
            stack.A[slot, :r].copy_(a)
            stack.B[slot, :, :r].copy_(b)
            stack.filled.add(slot)

    def clear(self, slot: int) -> None:
        self.ctx.generation += 1
        for stack in self.stacks.values():
            if slot in stack.filled:
                stack.A[slot].zero_()
                stack.B[slot].zero_()
                stack.filled.discard(slot)

    def nbytes(self) -> int:
        return sum(s.A.numel() * s.A.element_size() + s.B.numel() * s.B.element_size() for s in self.stacks.values())
