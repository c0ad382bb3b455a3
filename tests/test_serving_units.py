"""Small serving parts on their own: text deltas and stop strings, config errors, error mapping, metrics, archives."""
from __future__ import annotations

import io
import stat
import zipfile

import pytest


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def _stream(tokenizer, text: str, stop: list[str]):
    from loradex.serving.sampling import TextStream

    ts = TextStream(tokenizer, stop)
    out, hit = [], False
    for tok in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta, hit = ts.push(tok)
        out.append(delta)
        if hit:
            break
    if not hit:
        out.append(ts.flush())
    return out, hit


def test_text_stream_reassembles_text_and_stops_across_tokens(tokenizer):
    text = "Hello there, general Kenobi! You are a bold one. Ünïcödé ✓ done"
    deltas, hit = _stream(tokenizer, text, [])
    assert "".join(deltas) == text and not hit
    deltas, hit = _stream(tokenizer, text, ["bold one"])
    assert hit and "".join(deltas) == "Hello there, general Kenobi! You are a "
    # text that could start a stop string is held back, never emitted and then retracted
    deltas, hit = _stream(tokenizer, "a b c d", ["c X"])
    assert not hit and "".join(deltas) == "a b c d"
    deltas, _ = _stream(tokenizer, "✓✓✓", [])
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == "✓✓✓"


def test_sampling_params_and_configs_name_the_field():
    from loradex.hub.errors import InvalidConfig
    from loradex.serving.config import EngineConfig, ServerConfig
    from loradex.serving.sampling import SamplingParams

    for kwargs, word in (({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
                         ({"top_p": 0}, "top_p"), ({"stop": [""]}, "stop")):
        with pytest.raises(InvalidConfig, match=word):
            SamplingParams(**kwargs)
    for kwargs, flag in (({"quantize": "fp8"}, "--quantize"), ({"max_loaded": 0}, "--max-loaded"),
                         ({"max_batch": 0}, "--max-batch"), ({"batch_window_ms": -1}, "--batch-window-ms"),
                         ({"max_context": 1}, "--max-context"), ({"pin": ["a", "b"], "max_loaded": 1}, "--pin")):
        with pytest.raises(InvalidConfig, match=flag):
            EngineConfig(**kwargs)
    with pytest.raises(InvalidConfig, match="--port"):
        ServerConfig(port=70000)
    with pytest.raises(InvalidConfig, match="--api-key"):
        ServerConfig(api_key=" ")


def test_error_table_maps_classes_not_messages():
    from loradex.hub.errors import CatalogLocked, Conflict, IntegrityError, InvalidAdapter, NotFound
    from loradex.serving.errors import BadRequest, ContextTooLong, ModelNotFound, NotReady, QueueFull, Unauthorized, to_http

    cases = [(ModelNotFound("x"), 404, "model", "model_not_found"), (NotFound("x"), 404, None, "not_found"),
             (ContextTooLong("x", param="max_tokens"), 400, "max_tokens", "context_length_exceeded"),
             (BadRequest("x", param="n"), 400, "n", None), (InvalidAdapter("x"), 400, None, "invalid_adapter"),
             (Conflict("x"), 409, None, "conflict"), (IntegrityError("x"), 500, None, "adapter_integrity"),
             (Unauthorized("x"), 401, None, "invalid_api_key"), (QueueFull("x"), 429, None, "queue_full"),
             (NotReady("x"), 503, None, "not_ready"), (CatalogLocked("x"), 503, None, "catalog_locked"),
             (RuntimeError("secret detail"), 500, None, "internal_error")]
    for exc, status, param, code in cases:
        got_status, body, headers = to_http(exc)
        assert got_status == status and body["error"]["param"] == param and body["error"]["code"] == code, exc
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert to_http(QueueFull("x", retry_after=3))[2] == {"Retry-After": "3", "X-Loradex-Error": "QueueFull",
                                                          "X-Loradex-Exit": "11"}
    assert "secret detail" not in to_http(RuntimeError("secret detail"))[1]["error"]["message"]


def test_metrics_render_prometheus_text():
    from loradex.serving.metrics import serving_metrics

    m = serving_metrics()
    m.inc("requests_total", 'we"ird', "adapter", "ok")
    m.observe("request_latency_seconds", 0.3, "a@1")
    m.observe("request_latency_seconds", 7.0, "a@1")
    m.gauge("ready", "ready", lambda: [((), 1.0)])
    text = m.render()
    assert 'loradex_requests_total{adapter="we\\"ird",path="adapter",outcome="ok"} 1' in text
    assert 'loradex_request_latency_seconds_bucket{adapter="a@1",le="0.25"} 0' in text
    assert 'loradex_request_latency_seconds_bucket{adapter="a@1",le="0.5"} 1' in text
    assert 'loradex_request_latency_seconds_bucket{adapter="a@1",le="+Inf"} 2' in text
    assert 'loradex_request_latency_seconds_count{adapter="a@1"} 2' in text
    assert "# TYPE loradex_ready gauge\nloradex_ready 1\n" in text


def test_zip_links_and_escapes_are_refused(tmp_path):
    from loradex.hub.errors import InvalidAdapter
    from loradex.serving.uploads import extract_archive

    def make(entries):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name)
                info.external_attr = mode << 16
                zf.writestr(info, data)
        path = tmp_path / f"a{len(list(tmp_path.iterdir()))}.zip"
        path.write_bytes(buf.getvalue())
        return path

    ok = make([("x/adapter_config.json", "{}", stat.S_IFREG | 0o644), ("x/adapter_model.safetensors", "b", stat.S_IFREG | 0o644)])
    assert extract_archive(ok, tmp_path / "out-ok", 1 << 20).name == "x"
    for entries, word in (([("link", "/etc/passwd", stat.S_IFLNK | 0o777)], "link"),
                          ([("../up.txt", "x", stat.S_IFREG | 0o644)], ".."),
                          ([("/abs.txt", "x", stat.S_IFREG | 0o644)], "absolute"),
                          ([("big.bin", "x" * 5000, stat.S_IFREG | 0o644)], "expands past"),
                          ([("readme.txt", "x", stat.S_IFREG | 0o644)], "adapter_config.json")):
        with pytest.raises(InvalidAdapter, match=word):
            extract_archive(make(entries), tmp_path / f"out-{word[:4]}", 1000)
    assert not (tmp_path / "up.txt").exists()
