"""Merged models: served as a base, and --route-merged sending an adapter's requests to its merged model."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import make_adapter

PROMPTS = ["The quick brown fox", "Once upon a time"]


@pytest.fixture
def merged_setup(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    """Adapter 'mad' on base 'tiny', merged with PEFT and registered as base 'tiny-mad' plus a merges row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradex.hub.bases import add_base
    from loradex.hub.catalog import to_json, utcnow
    from loradex.hub.registry import register_adapter

    folder = make_adapter(tiny_base_dir, tmp_path / "mad", r=8, alpha=16, seed=5, scale=0.3)
    row = register_adapter(catalog, store, folder, "mad", base="tiny")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32), folder)
    merged = model.merge_and_unload()
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    for f in tiny_base_dir.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    add_base(catalog, store, "tiny-mad", str(out), kind="merged", merged_from_version_id=row["id"])
    with catalog.transaction() as cur:
        cur.execute("INSERT INTO merges (adapter_version_id, base, merged_into, dtype, path, files, size_bytes, "
                    "check_result, base_name, created_at) VALUES (?, 'tiny', 'full-precision', 'fp32', ?, ?, 0, "
                    "NULL, 'tiny-mad', ?)", [row["id"], str(out), to_json({}), utcnow()])
    return row


def test_route_merged_sends_adapter_requests_to_the_merged_model(catalog, store, merged_setup):
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    eng = Engine.load(EngineConfig(base="tiny", quantize="none", route_merged=True), catalog=catalog, store=store)
    try:
        target = eng.resolve(model="mad")
        assert target.path == "merged" and target.engine is not eng and target.engine.base_name == "tiny-mad"
        via_merged = [eng.generate(p, model="mad", max_tokens=10, temperature=0) for p in PROMPTS]
        assert all(c.path == "merged" for c in via_merged)
        eng.config.route_merged = False  # the same request through the shared base + LoRA
        via_adapter = [eng.generate(p, model="mad", max_tokens=10, temperature=0) for p in PROMPTS]
        assert all(c.path == "adapter" for c in via_adapter)
        base = [eng.generate(p, max_tokens=10, temperature=0) for p in PROMPTS]
        for m, a, b in zip(via_merged, via_adapter, base):
            assert m.token_ids == a.token_ids
            assert a.token_ids != b.token_ids
        assert eng.metrics.value("requests_total", "mad@1", "merged", "ok") == 2  # which path served is labelled
        assert eng.metrics.value("requests_total", "mad@1", "adapter", "ok") == 2
        assert eng.cache.loaded() and eng.cache.loaded()[0]["adapter"] == "mad"
    finally:
        eng.shutdown()


def test_merged_model_served_as_base(catalog, store, merged_setup):
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    eng = Engine.load(EngineConfig(base="tiny", quantize="none"), catalog=catalog, store=store)
    merged = Engine.load(EngineConfig(base="tiny-mad", quantize="none"), catalog=catalog, store=store)
    try:
        for p in PROMPTS:
            assert (merged.generate(p, max_tokens=10, temperature=0).token_ids
                    == eng.generate(p, adapter="mad", max_tokens=10, temperature=0).token_ids)
        from loradex.serving.errors import ModelNotFound

        with pytest.raises(ModelNotFound):  # adapters of the original base are not applied to the merged one
            merged.resolve(model="mad")
    finally:
        eng.shutdown()
        merged.shutdown()
