"""Every route of the API fuzzed from its own OpenAPI schema (schemathesis): no 5xx, responses match the schema.

A real uvicorn on loopback over a tiny random base with two adapters and an API key; generation is
capped to a few tokens per request. Cases come from hypothesis with a bounded example count per
operation (LORADEX_FUZZ_EXAMPLES, default 40), so the suite takes minutes, not hours. The server runs
with ``confine_local_paths`` and the test's working directory is a temp folder: fuzzed path arguments
are refused, and nothing outside the test's folders can be touched. (The first run of this suite
emptied the checkout it ran in through ``merges.record``'s temp-folder argument: store.owned_tmp
now guards that, and this set-up keeps a regression from hurting anything but a temp folder.)

Run: `make test-fuzz` (installs the fuzz extra), or `pytest -m fuzz tests/test_fuzz_api.py`.
"""
from __future__ import annotations

import os

import pytest

from tests.test_http import KEY, Server, _home

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("LORADEX_FUZZ_EXAMPLES", "40"))
# bases.init converts the default base's GGUF (about 40 s, once): not a route to hammer with random bodies
SKIP = {"POST /v1/ops/bases.init"}


@pytest.fixture(scope="module")
def fuzz_server(tiny_base_dir, tmp_path_factory):
    from loradex.serving.config import EngineConfig, ServerConfig

    root, settings_, cat, store = _home(tmp_path_factory, tiny_base_dir,
                                        {"good": (4, ("q_proj", "v_proj"), 1), "other": (4, ("q_proj",), 2)})
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fuzz-cwd"))
    config = ServerConfig(engine=EngineConfig(base="tiny", quantize="none", max_loaded=2, batch_window_ms=5,
                                              max_tokens_limit=4, default_max_tokens=4),
                          api_key=KEY, max_body_bytes=64 * 1024, max_upload_bytes=1 << 20, confine_local_paths=True)
    server = Server(config, settings_, cat, store)
    try:
        yield server
    finally:
        server.stop()
        cat.close()
        os.chdir(cwd)


def test_no_route_answers_5xx_or_off_schema(fuzz_server):
    """Each operation of /openapi.json, EXAMPLES generated cases each; all failures are reported together."""
    # imported here, not at collection: the default suite deselects this module and has no fuzz extra;
    # under -m fuzz a missing extra is a failure, not a skip (make test-fuzz installs it)
    import schemathesis
    from hypothesis import HealthCheck, given, settings  # hypothesis comes with schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    api = schemathesis.openapi.from_dict(fuzz_server.app.openapi())
    failures, operations = [], 0
    for result in api.get_all_operations():
        operation = result.ok()
        if operation.label in SKIP:
            continue
        operations += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"},
                                   checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
                                   timeout=60)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001  (collected, reported below)
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations > 60  # every route of the API was reached (resource routes + one per catalog op)
    assert failures == [], "\n\n".join(failures)
