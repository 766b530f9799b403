"""The gRPC server, started for real on loopback with an export of a tiny model."""

import concurrent.futures
import time

import grpc
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from keras_llm.export.saved_model import export_model
from keras_llm.serving.engine import EngineConfig
from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc
from keras_llm.serving.server import Server
from tests.helpers import SMOLLM2_CHAT_TEMPLATE, tiny_language_model

DEADLINE = 120


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=6, chat_template=SMOLLM2_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def server(lm, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "tiny"
    export_model(lm, base.parent, "tiny", max_new_tokens=16, progress=False)
    config = EngineConfig(max_slots=4, max_queue=3, max_length=128, prompt_bucket=16)
    srv = Server({"tiny": str(base)}, port=0, engine_config=config, metrics_port=0,
                 poll_seconds=0, enable_reflection=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    SERVERS[id(srv.servables)] = srv
    yield channel, srv.servables
    channel.close()
    srv.drain(0)


def stream(channel, text=None, ids=None, messages=None, chat=False, system="", **sampling):
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(chat=chat, system=system,
                                             sampling=generation_pb2.SamplingOptions(**sampling))
    if ids is not None:
        request.ids.ids.extend(ids)
    if text is not None:
        request.text = text
    for message in messages or ():
        request.messages.add(role=message["role"], content=message["content"])
    deltas, summary = [], None
    for response in stub.Generate(request, timeout=DEADLINE):
        if response.HasField("delta"):
            deltas.append(response.delta)
        else:
            summary = response.summary
    return deltas, summary


def test_health_serving_after_warmup(server):
    channel, _ = server
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_predict_with_tf_serving_client(lm, server):
    channel, _ = server
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = "serving_default"
    request.inputs["prompt"].CopyFrom(tf.make_tensor_proto(["hello", "world!"]))
    response = stub.Predict(request, timeout=DEADLINE)
    texts = tf.make_ndarray(response.outputs["text"]).tolist()
    expected = lm.generate(["hello", "world!"], max_new_tokens=16)
    assert [t.decode("utf-8", "replace") for t in texts] == [c.text for c in expected]
    assert response.model_spec.version.value == 1
    request.output_filter.append("num_tokens")
    filtered = stub.Predict(request, timeout=DEADLINE)
    assert set(filtered.outputs) == {"num_tokens"}


def test_model_metadata_and_status(server):
    channel, _ = server
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "tiny"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "generate", "generate_ids", "score"} <= set(signatures.signature_def)
    assert signatures.signature_def["serving_default"].inputs["prompt"].dtype == tf.string.as_datatype_enum
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=request.model_spec), timeout=30)
    assert status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.mark.parametrize("mutate, code", [
    (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.model_spec.version.__setattr__("value", 7), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.inputs["wrong"].CopyFrom(tf.make_tensor_proto(["x"])), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["prompt"].CopyFrom(tf.make_tensor_proto([1, 2])), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["prompt"].CopyFrom(tf.make_tensor_proto([["a"]])), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_predict_errors_use_tf_serving_codes(server, mutate, code):
    channel, _ = server
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.inputs["prompt"].CopyFrom(tf.make_tensor_proto(["hello"]))
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=DEADLINE)
    assert info.value.code() == code
    assert stream(channel, text="still serving", max_new_tokens=2)[1].generated_tokens >= 0


def test_classify_is_unimplemented(server):
    from tensorflow_serving.apis import classification_pb2
    channel, _ = server
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(classification_pb2.ClassificationRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_stream_matches_non_streaming_and_keeps_utf8(lm, server):
    channel, _ = server
    for prompt in ("hello", "你好 🤖"):
        deltas, summary = stream(channel, text=prompt, max_new_tokens=12)
        expected = lm.generate(prompt, max_new_tokens=12)
        assert list(summary.token_ids) == expected.token_ids
        assert "".join(d.text for d in deltas) == summary.text == expected.text
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids
        assert summary.finish_reason in ("stop", "length")
    deltas, summary = stream(channel, ids=lm.encode("你好"), max_new_tokens=4)
    assert summary.prompt_tokens == len(lm.encode("你好"))


def test_concurrent_streams_get_their_own_tokens(lm, server):
    channel, _ = server
    # 4 slots + 3 queue places: 7 streams fit without RESOURCE_EXHAUSTED.
    prompts = [f"request number {i}" for i in range(7)]
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        results = list(pool.map(lambda p: stream(channel, text=p, max_new_tokens=10)[1], prompts))
    for prompt, summary in zip(prompts, results):
        assert list(summary.token_ids) == lm.generate(prompt, max_new_tokens=10).token_ids


def test_sampling_matches_generator(lm, server):
    channel, _ = server
    _, summary = stream(channel, text="hello", max_new_tokens=10, temperature=0.8, top_k=30,
                        top_p=0.9, seed=5)
    expected = lm.generate("hello", max_new_tokens=10, temperature=0.8, top_k=30, top_p=0.9, seed=5)
    assert list(summary.token_ids) == expected.token_ids


def test_invalid_generation_requests(server):
    channel, _ = server
    for kwargs in (dict(text=""), dict(ids=[10 ** 6]), dict(text="x" * 200, max_new_tokens=16),
                   dict(text="hi", temperature=-1.0)):
        with pytest.raises(grpc.RpcError) as info:
            stream(channel, **kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and you?"}]


def test_messages_are_rendered_by_the_chat_template(lm, server):
    channel, _ = server
    rendered = lm.host_tokenizer.apply_chat_template(CONVERSATION)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # the model's template
    _, by_messages = stream(channel, messages=CONVERSATION, max_new_tokens=8, ignore_eos=True)
    _, by_text = stream(channel, text=rendered, max_new_tokens=8, ignore_eos=True)
    assert by_messages.prompt_tokens == len(lm.host_tokenizer.encode(rendered))
    assert list(by_messages.token_ids) == list(by_text.token_ids)
    assert list(by_messages.token_ids) == lm.generate(CONVERSATION, chat=True, max_new_tokens=8,
                                                      ignore_eos=True).token_ids
    # One user turn as messages is the chat=True text prompt (default system message included).
    _, one = stream(channel, messages=CONVERSATION[1:2], max_new_tokens=4)
    _, chat = stream(channel, text="hi", chat=True, max_new_tokens=4)
    assert one.prompt_tokens == chat.prompt_tokens and list(one.token_ids) == list(chat.token_ids)


@pytest.mark.parametrize("kwargs", [
    dict(messages=[{"role": "robot", "content": "hi"}]),
    dict(messages=CONVERSATION[:1] + [{"role": "user", "content": "x" * 200}]),
    dict(messages=CONVERSATION[1:2], text="hi"),
    dict(messages=CONVERSATION[1:2], ids=[5, 6]),
    dict(messages=CONVERSATION[1:2], system="Be brief."),
])
def test_invalid_messages(server, kwargs):
    channel, _ = server
    with pytest.raises(grpc.RpcError) as info:
        stream(channel, max_new_tokens=4, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
    if kwargs["messages"][0]["role"] == "robot":
        assert "role must be one of system, user, assistant" in info.value.details()


def test_cancel_frees_slot_and_queue_limit(server):
    channel, servables = server
    engine = servables.models["tiny"].engine
    stub = generation_pb2_grpc.GenerationStub(channel)
    long_request = generation_pb2.GenerateRequest(
        text="a", sampling=generation_pb2.SamplingOptions(max_new_tokens=100))
    # The scheduler held still (a tiny model answers 100 tokens in a few
    # milliseconds): 4 slots' worth and the 3 queue places stay taken.
    with engine.engine._driver:  # pylint: disable=protected-access
        calls = [stub.Generate(long_request, timeout=DEADLINE) for _ in range(7)]
        deadline = time.time() + 30
        while engine.stats()["waiting"] < 7 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Generate(long_request, timeout=DEADLINE))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            call.cancel()
    deadline = time.time() + 30
    idle = {"running": 0, "decoding": 0, "prefilling": 0, "waiting": 0}
    while engine.stats() != idle and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats() == idle
    start = time.time()
    _, summary = stream(channel, text="after cancel", max_new_tokens=3)
    assert summary.generated_tokens >= 0 and time.time() - start < 30


def test_metrics_are_scraped_and_counted(server, lm):
    import urllib.request
    channel, servables = server
    _, summary = stream(channel, text="count me", max_new_tokens=5, ignore_eos=True)
    assert summary.generated_tokens == 5
    # The fixture's server exposes metrics on an ephemeral port.
    port = server_metrics_port(servables)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    metric = lambda name: sum(float(line.split()[-1]) for line in text.splitlines()  # noqa: E731
                              if line.startswith(name + "{") and 'model="tiny"' in line)
    assert metric("keras_llm_generation_tokens_total") >= 5
    assert metric("keras_llm_time_to_first_token_seconds_count") >= 1
    assert metric("keras_llm_inter_token_latency_seconds_count") >= 4
    assert metric("keras_llm_queue_time_seconds_count") >= 1
    assert metric("keras_llm_e2e_request_latency_seconds_count") >= 1
    assert "keras_llm_requests_running" in text and "keras_llm_requests_waiting" in text


def server_metrics_port(servables):
    return SERVERS[id(servables)].metrics_port


SERVERS = {}


def test_reflection_lists_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    channel, _ = server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "keras_llm.serving.Generation",
            "grpc.health.v1.Health"} <= names


def test_client_commands(server, capsys, monkeypatch):
    import io
    import json as json_lib

    from keras_llm import cli
    channel, servables = server
    target = f"127.0.0.1:{SERVERS[id(servables)].port}"
    assert cli.main(["client", "--target", target, "--prompt", "hello", "--max-new-tokens", "5",
                     "--json"]) == 0
    record = json_lib.loads(capsys.readouterr().out)
    _, summary = stream(channel, text="hello", max_new_tokens=5)
    assert record["token_ids"] == list(summary.token_ids) and record["text"] == summary.text
    assert cli.main(["client", "--target", target, "--predict", "--model_name", "tiny",
                     "--prompt", "hello", "--json"]) == 0
    assert "text" in json_lib.loads(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert cli.main(["chat", "--target", target, "--max-new-tokens", "4"]) == 0
    assert "model> " in capsys.readouterr().out
    assert cli.main(["client", "--target", target, "--model_name", "nope", "--prompt", "x"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def _chat(server, monkeypatch, stdin, *flags):
    """Runs `keras-llm chat` on `stdin` against the fixture's server; returns
    its exit status and the messages of every request it sent."""
    import io

    from keras_llm import cli
    from keras_llm.serving.client import Client
    _, servables = server
    sent, original = [], Client.stream_responses

    def recording(self, prompt=None, **kwargs):
        sent.append([dict(m) for m in kwargs.get("messages") or ()])
        yield from original(self, prompt, **kwargs)

    monkeypatch.setattr(Client, "stream_responses", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(["chat", "--target", f"127.0.0.1:{SERVERS[id(servables)].port}",
                     "--max-new-tokens", "4", *flags])
    return code, sent


SYSTEM = {"role": "system", "content": "Be brief."}


def test_chat_command_keeps_the_conversation(server, capsys, monkeypatch):
    code, sent = _chat(server, monkeypatch, "hello\nworld\n/reset\nagain\n",
                       "--system", "Be brief.")
    out = capsys.readouterr().out
    assert code == 0 and len(sent) == 3
    assert sent[0] == [SYSTEM, {"role": "user", "content": "hello"}]
    first_answer = sent[1][2]
    assert sent[1] == sent[0] + [first_answer, {"role": "user", "content": "world"}]
    assert first_answer["role"] == "assistant" and "model> " + first_answer["content"] in out
    assert sent[2] == [SYSTEM, {"role": "user", "content": "again"}]  # after /reset
    assert "(new conversation)" in out


def test_chat_command_drops_the_oldest_turns_that_do_not_fit(lm, server, capsys, monkeypatch):
    first, second = "a" * 40, "b" * 40
    limit = 128  # the fixture's max_length; 4 new tokens per turn
    alone = [SYSTEM, {"role": "user", "content": second}]
    assert len(lm.encode(alone, chat=True)) + 4 <= limit
    code, sent = _chat(server, monkeypatch, f"{first}\n{second}\n", "--system", "Be brief.")
    err = capsys.readouterr().err
    assert code == 0 and len(sent) == 3, err
    assert len(sent[1]) == 4 and len(lm.encode(sent[1], chat=True)) + 4 > limit  # refused
    assert sent[2] == alone  # the oldest exchange dropped, the system message kept
    assert "dropped the oldest 1 exchange" in err and len(err.strip().splitlines()) == 1


def test_kv_cache_sized_from_memory_budget_and_batching_file(server, tmp_path):
    from keras_llm.serving.engine import ExportedModel
    from keras_llm.serving.server import read_batching_parameters
    _, servables = server
    path = servables.lookup("tiny").path
    per_slot = servables.lookup("tiny").engine.bytes_per_slot
    engine = ExportedModel(path, EngineConfig(max_slots=16, max_length=128, prompt_bucket=16,
                                              memory_budget_bytes=int(per_slot * 2.5)))
    try:
        assert engine.num_slots == 2 and engine.bytes_per_slot == per_slot
        # 2 layers x (K, V) x 2 KV heads x 4 dims x 128 positions x 4 bytes
        assert per_slot == 2 * 2 * 2 * 4 * 128 * 4
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="below one slot"):
        ExportedModel(path, EngineConfig(max_length=128, memory_budget_bytes=per_slot // 2))
    batching = tmp_path / "batching.pbtxt"
    batching.write_text("max_batch_size { value: 8 }\nmax_enqueued_batches { value: 20 }\n"
                        "batch_timeout_micros { value: 5000 }\n")
    config = read_batching_parameters(str(batching), EngineConfig())
    assert (config.max_slots, config.max_queue) == (8, 20)


def test_stop_strings_and_deadline(lm, server):
    channel, servables = server
    _, full = stream(channel, text="hello", max_new_tokens=12, ignore_eos=True)
    text = full.text
    assert len(text) > 4
    for start in (2, 3):  # stop strings spanning token boundaries are held back, never sent
        cut = text[start:start + 2]
        deltas, summary = stream(channel, text="hello", max_new_tokens=12, ignore_eos=True,
                                 stop=[cut, "\x00never"])
        assert summary.finish_reason == "stop"
        assert summary.text == text[:text.index(cut)] == "".join(d.text for d in deltas)
        assert cut not in summary.text
    # A deadline that passes mid-generation ends the call and frees the slot.
    engine = servables.lookup("tiny").engine
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(
        text="a", sampling=generation_pb2.SamplingOptions(max_new_tokens=100, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Generate(request, timeout=0.3):
            time.sleep(0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 30
    while engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0
