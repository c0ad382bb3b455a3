"""The adapter cache: which adapter versions sit in which LoRA-bank slot, LRU-evicted.

Used only from the engine thread. At most ``max_loaded`` adapters are loaded;
a slot whose adapter has rows in the running batch is busy and never evicted,
and pinned adapters are never evicted. Loading verifies the version's sha256
(``hub.registry.adapter_folder``) and reads the safetensors straight into the
slot.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from loradex.serving.lora import AdapterWeights, LoRABank
from loradex.serving.metrics import Metrics


class CacheBusy(Exception):
    """Every slot holds an adapter in use; the request waits for one to free up."""


@dataclass
class Entry:
    slot: int
    row: dict
    users: int = 0
    pinned: bool = False


def ref_label(row: dict) -> str:
    return f"{row['adapter']}@{row['version']}"


class AdapterCache:
    """LRU map: adapter version id -> bank slot."""

    def __init__(self, bank: LoRABank, load: Callable[[dict], AdapterWeights], max_loaded: int, metrics: Metrics):
        self.bank = bank
        self._load = load
        self.max_loaded = max_loaded
        self.metrics = metrics
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.last_load_s: float | None = None

    def _free_slot(self) -> int:
        used = {e.slot for e in self.entries.values()}
        if len(self.entries) < self.max_loaded:
            return next(i for i in range(self.max_loaded) if i not in used)
        for vid, e in self.entries.items():  # oldest first
            if e.users == 0 and not e.pinned:
                del self.entries[vid]
                self.bank.clear(e.slot)
                self.metrics.inc("adapter_evictions_total")
                return e.slot
        raise CacheBusy()

    def acquire(self, row: dict, *, pin: bool = False) -> int:
        """The slot holding ``row``'s adapter, loading it if needed; counts one user."""
        vid = row["id"]
        entry = self.entries.get(vid)
        if entry is not None:
            self.entries.move_to_end(vid)
            self.metrics.inc("adapter_hits_total")
        else:
            if len(self.entries) >= self.max_loaded and all(e.users or e.pinned for e in self.entries.values()):
                raise CacheBusy()
            t0 = time.perf_counter()
            try:
                weights = self._load(row)
            except Exception:
                self.metrics.inc("adapter_load_failures_total", ref_label(row))
                raise
            slot = self._free_slot()
            self.bank.write(slot, weights)
            self.last_load_s = time.perf_counter() - t0
            self.metrics.observe("adapter_load_seconds", self.last_load_s)
            self.metrics.inc("adapter_loads_total")
            entry = self.entries[vid] = Entry(slot=slot, row=row)
        entry.pinned = entry.pinned or pin
        if not pin:
            entry.users += 1
        return entry.slot

    def release(self, vid: int) -> None:
        entry = self.entries.get(vid)
        if entry is not None and entry.users > 0:
            entry.users -= 1

    def drop(self, vid: int) -> bool:
        """Forget a version (deleted from the catalog); its rows must be gone."""
        entry = self.entries.get(vid)
        if entry is None or entry.users:
            return False
        del self.entries[vid]
        self.bank.clear(entry.slot)
        return True

    def loaded(self) -> list[dict]:
        return [{"adapter": e.row["adapter"], "version": e.row["version"], "slot": e.slot, "users": e.users,
                 "pinned": e.pinned} for e in self.entries.values()]
