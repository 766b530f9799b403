"""The reliability suite (benchmarks/reliability.py), bounded, against a real
`keras-llm serve` process on a tiny export: malformed requests over gRPC and
HTTP (named cases, seeded fuzz, hypothesis-generated JSON bodies), overload,
a deadline storm, kill -9 and restart, SIGTERM with streams running."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import reliability
from keras_llm.export.saved_model import export_model
from tests.helpers import tiny_language_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability")
    export_model(tiny_language_model(seed=4), base, "tiny", max_new_tokens=8, progress=False)
    return str(base)


@pytest.fixture(scope="module")
def server(exported):
    srv = reliability.Server(exported, "tiny", slots=2, queue=2)
    srv.start()
    yield srv
    srv.stop()


def test_every_malformed_request_gets_its_status_and_the_next_one_succeeds(server):
    report, failures = reliability.malformed(server, hang_s=60, fuzz=40, seed=0)
    assert failures == []
    assert report["requests"] >= 80 + 80  # named cases plus fuzz over both APIs
    assert report["wrong"] == report["hangs"] == 0
    assert not report["crashed"] and report["good_after"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.dictionaries(
    st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens",
                     "temperature", "top_p", "top_k", "seed", "stop", "logprobs",
                     "top_logprobs", "n", "echo", "instances", "inputs", "signature_name",
                     "tokens", "stream_options", "ignore_eos"]), JSON, max_size=6)
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models/tiny:predict",
                         "/v1/models/tiny/versions/1:predict", "/tokenize", "/detokenize"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=PATHS, body=FIELDS, named=st.booleans())
def test_generated_json_bodies_never_break_the_server(server, path, body, named):
    if named:
        body["model"] = "tiny"
    body.pop("stream", None)  # a stream answers 200 before it could fail
    raw = json.dumps(body, allow_nan=True).encode()
    response = httpx.post(f"{server.url}{path}", content=raw, timeout=60)
    assert response.status_code in (200, 400, 404, 413), (body, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert error if isinstance(error, str) else error["message"]
    assert server.alive()


def test_overload_sheds_and_admitted_requests_finish(server):
    for factor in (2, 4):
        report = reliability.overload(server, factor, new_tokens=32)
        assert report["other_errors"] == 0, report
        assert report["ok"] + report["resource_exhausted"] == report["requests"]
        assert report["ok"] >= server.slots + server.queue
        assert report["health_checks"] >= 1 and report["slowest_health_s"] < 5


def test_deadline_storm_leaves_the_queue_empty(server):
    report = reliability.deadline_storm(server, count=16)
    assert set(report["codes"]) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ok"}
    assert report["waiting_after"] == 0 and report["good_after"]


def test_kill_then_restart_and_sigterm_with_streams(server):
    assert reliability.kill_and_restart(server)["serving_after_restart_s"] > 0
    report = reliability.sigterm_with_streams(server, streams=2, new_tokens=32)
    assert report == {"streams": 2, "finished": 2, "exit_code": 0}


def test_a_short_soak_has_no_errors(server):
    if not server.alive():
        server.start()
    report = reliability.soak(server, streams=server.slots + server.queue, seconds=5,
                              new_tokens=8)
    assert report["errors"] == 0 and report["requests"] > 0, report
    assert report["ttft_p50_s"] is not None and report["itl_p50_s"] is not None


def test_hot_reload_under_load_fails_nothing_within_the_memory_budget(exported):
    report = reliability.hot_reload(exported, "tiny", streams=4, new_tokens=8)
    assert report["serving_version"] == 2
    assert report["requests"] > 0 and report["failed"] == 0, report
    assert report["under_budget"], report
