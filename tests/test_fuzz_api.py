"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) on a tiny model: no request,
however odd, may produce a server error."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from edgellm.compiler import BuildOptions, build  # noqa: E402
from edgellm.runtime.generator import Generator  # noqa: E402
from edgellm.server.app import create_app  # noqa: E402
from helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    art = build(tmp / "hf", tmp / "art", BuildOptions(kv_cache_len=64, prefill_len=16))
    app = create_app(Generator.load(art, threads=1), "tiny", max_body=16 * 1024)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_no_request_makes_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
