"""HTTP (`--rest_api_port`): the OpenAI API driven by the official `openai`
SDK, TF Serving's REST API with its documented bodies, and the same tokens
as gRPC `Predict` and `Generate`; the real server on loopback throughout."""

import base64
import json
import math
import shutil

import grpc
import httpx
import jinja2
import numpy as np
import openai
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc)

from keras_llm.export.saved_model import export_model
from keras_llm.serving.client import Client
from keras_llm.serving.engine import EngineConfig
from keras_llm.serving.server import Server, read_model_config
from tests.helpers import SMOLLM2_CHAT_TEMPLATE, tiny_language_model

TIMEOUT = 120
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hell"},
                {"role": "user", "content": "he he"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=6, chat_template=SMOLLM2_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def export_dir(lm, tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    export_model(lm, base, "tiny", max_new_tokens=16, progress=False)
    return base / "tiny"


@pytest.fixture(scope="module")
def server(export_dir):
    config = EngineConfig(max_slots=4, max_queue=3, max_length=128, prompt_bucket=16)
    srv = Server({"tiny": str(export_dir)}, port=0, engine_config=config, poll_seconds=0,
                 rest_api_port=0)
    yield srv
    srv.drain(0)


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.rest_api_port}/v1",
                       api_key="unused", max_retries=0, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.rest_api_port}",
                      timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=TIMEOUT) as client:
        yield client


def rendered(messages):
    """The conversation rendered by jinja2 directly (not through keras-llm)."""
    return jinja2.Environment().from_string(SMOLLM2_CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True)


# ----- OpenAI: the SDK ------------------------------------------------------

def test_models_list(oai, server):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].owned_by == "keras-llm"
    # KServe's layout: the OpenAI API under /openai/v1 too (where /models/NAME
    # is OpenAI's; under /v1 it stays TF Serving's model status).
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.rest_api_port}/openai/v1",
                       api_key="unused", max_retries=0, timeout=TIMEOUT) as kserve:
        assert kserve.models.retrieve("tiny").id == "tiny"
        assert kserve.completions.create(model="tiny", prompt="he", max_tokens=2).usage


def test_chat_greedy_multi_turn_equals_engine(oai, grpc_client, lm):
    chat = oai.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    prompt = rendered(CONVERSATION)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    summary = grpc_client.generate(prompt, max_new_tokens=8, ignore_eos=True)
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == summary.text
    assert choice.finish_reason == "length"
    assert chat.usage.prompt_tokens == len(lm.tokenizer.encode(prompt)) == summary.prompt_tokens
    assert chat.usage.completion_tokens == 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8


def test_chat_default_system_message_from_template(oai, grpc_client):
    messages = [{"role": "user", "content": "hello"}]
    prompt = rendered(messages)
    assert "You are a helpful AI assistant named SmolLM" in prompt
    chat = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == grpc_client.generate(prompt, max_new_tokens=1).prompt_tokens


def test_chat_stream_concatenates_to_the_whole_text(oai):
    kwargs = dict(model="tiny", messages=CONVERSATION, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True,
                                              stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_prompt_forms_and_echo(oai, grpc_client):
    one = oai.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0,
                                 extra_body={"ignore_eos": True})
    expected = grpc_client.generate("hello", max_new_tokens=5, ignore_eos=True)
    assert one.choices[0].text == expected.text
    assert one.usage.prompt_tokens == expected.prompt_tokens
    echo = oai.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0,
                                  echo=True, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == "hello" + expected.text
    batch = oai.completions.create(model="tiny", prompt=["hello", "he"], max_tokens=5,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == expected.text
    assert batch.choices[1].text == grpc_client.generate("he", max_new_tokens=5,
                                                         ignore_eos=True).text
    ids = oai.completions.create(model="tiny", prompt=[5, 6, 7],
                                 max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert ids.choices[0].text == grpc_client.generate([5, 6, 7], max_new_tokens=4,
                                                       ignore_eos=True).text
    streamed = oai.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0,
                                      echo=True, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echo.choices[0].text


def test_stop_strings(oai, grpc_client):
    full = grpc_client.generate("hello", max_new_tokens=12, ignore_eos=True).text
    stop = full[3:5]
    cut = full[:full.index(stop)]
    out = oai.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0,
                                 stop=[stop, "never appears"], extra_body={"ignore_eos": True})
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    chat = oai.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    text = chat.choices[0].message.content
    stopped = oai.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=12,
                                          temperature=0, stop=text[2:4],
                                          extra_body={"ignore_eos": True})
    assert stopped.choices[0].message.content == text[:text.index(text[2:4])]
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_matches_grpc(oai, grpc_client):
    kwargs = dict(model="tiny", prompt="hello", max_tokens=10, temperature=1.0, top_p=0.9,
                  extra_body={"ignore_eos": True})
    a = oai.completions.create(seed=7, **kwargs).choices[0].text
    b = oai.completions.create(seed=7, **kwargs).choices[0].text
    c = oai.completions.create(seed=8, **kwargs).choices[0].text
    assert a == b != c
    assert a == grpc_client.generate("hello", max_new_tokens=10, temperature=1.0, top_p=0.9,
                                     seed=7, ignore_eos=True).text


def test_logprobs_are_the_model_distribution(oai, lm):
    chat = oai.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 4
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-6)  # greedy: the best token
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    # The first token's logprob, computed independently by the Keras model.
    ids = lm.tokenizer.encode(rendered(CONVERSATION))
    logits = lm.model(tf.constant([ids], tf.int32)).numpy()[0, -1].astype(np.float64)
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    assert math.isclose(content[0].logprob, expected.max(), abs_tol=2e-3)
    completion = oai.completions.create(model="tiny", prompt="hello", max_tokens=3,
                                        temperature=0, logprobs=2,
                                        extra_body={"ignore_eos": True})
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 3
    assert logprobs.text_offset == [0, len(logprobs.tokens[0]),
                                    len(logprobs.tokens[0]) + len(logprobs.tokens[1])]
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_openai_errors(oai):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="nope", messages=messages)
    assert info.value.body["code"] == "model_not_found"
    cases = [dict(n=2), dict(temperature=-1),
             dict(top_p=0), dict(presence_penalty=0.5), dict(max_tokens=-3),
             dict(stop=[""]), dict(logprobs=True, top_logprobs=50),
             dict(max_tokens=100000), dict(messages=[{"role": "robot", "content": "x"}]),
             dict(messages=[]), dict(tools=[{"type": "function",
                                             "function": {"name": "f"}}])]
    for case in cases:
        kwargs = {"model": "tiny", "messages": messages, **case}
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(**kwargs)
        error = info.value.body
        assert error["type"] == "invalid_request_error" and error["message"], case
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny", messages=messages, n=3)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt="hi", echo=True, logprobs=1)
    assert info.value.body["param"] == "echo"
    for raw in (b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}',
                b'{"model": "tiny", "prompt": "hi", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "hi", "max_tokens": "5"}',
                b'{"model": "tiny", "prompt": "hi", "seed": 1.5}', b'[1, 2]', b'{bad'):
        response = httpx.post(f"{oai.base_url}completions", content=raw, timeout=TIMEOUT)
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["message"], raw
    # A prompt that cannot fit is refused before it is tokenized.
    huge = httpx.post(f"{oai.base_url}completions", timeout=TIMEOUT,
                      json={"model": "tiny", "prompt": "hello " * 1_000_000})
    assert huge.status_code == 400 and "exceeds the per-sequence limit" in huge.text
    # unknown extra fields are ignored, as vLLM does
    ok = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                     extra_body={"some_future_field": 1}, user="me")
    assert ok.usage.completion_tokens <= 2


def test_queue_full_is_rate_limit_error(oai, server):
    """Hold the scheduler, fill the queue, and the next request is a 429."""
    engine = server.servables.lookup("tiny").engine.engine
    from keras_llm.runtime.params import SamplingParams
    waiting = []
    with engine._driver:  # pylint: disable=protected-access
        try:
            while True:
                waiting.append(engine.submit([5, 6], SamplingParams(max_new_tokens=2)))
        except Exception as error:  # the queue is full now
            assert type(error).__name__ == "QueueFull"
        with pytest.raises(openai.RateLimitError):
            oai.completions.create(model="tiny", prompt="hi", max_tokens=2)
        for job in waiting:
            job.cancel()
    for job in waiting:
        job.done.wait(TIMEOUT)
    assert oai.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


# ----- TF Serving REST ------------------------------------------------------

def test_rest_status_and_metadata(http):
    status = http.get("/v1/models/tiny").json()
    assert status == {"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]}
    assert http.get("/v1/models/tiny/versions/1").status_code == 200
    assert http.get("/v1/models/tiny/versions/2").status_code == 404
    metadata = http.get("/v1/models/tiny/metadata").json()
    assert metadata["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "generate", "generate_ids", "score"} <= set(signatures)
    assert signatures["generate"]["inputs"]["prompt"]["dtype"] == "DT_STRING"
    assert http.get("/v1/models/nope").json()["error"].startswith("Servable not found")


def test_rest_predict_same_tokens_as_grpc(http, grpc_client):
    prompts = ["hello", "he"]
    grpc_out = grpc_client.predict("tiny", prompts)
    generate = [grpc_client.generate(p, max_new_tokens=16) for p in prompts]
    row = http.post("/v1/models/tiny:predict", json={"instances": prompts})
    assert row.status_code == 200, row.text
    predictions = row.json()["predictions"]
    for i, prediction in enumerate(predictions):
        n = prediction["num_tokens"]
        assert n == grpc_out["num_tokens"][i] == len(generate[i].token_ids)
        assert prediction["token_ids"][:n] == grpc_out["token_ids"][i][:n].tolist()
        assert prediction["token_ids"][:n] == list(generate[i].token_ids)
        assert prediction["text"] == grpc_out["text"][i].decode("utf-8", errors="replace")
    b64 = http.post("/v1/models/tiny/versions/1:predict", json={
        "signature_name": "serving_default",
        "instances": [{"b64": base64.b64encode(p.encode()).decode()} for p in prompts]})
    assert b64.json()["predictions"] == predictions
    columnar = http.post("/v1/models/tiny:predict", json={
        "signature_name": "generate",
        "inputs": {"prompt": prompts, "max_new_tokens": [4], "temperature": [0.0],
                   "top_k": [0], "top_p": [1.0], "seed": [0]}})
    outputs = columnar.json()["outputs"]
    assert outputs["num_tokens"] == [4, 4]
    assert [ids[:4] for ids in outputs["token_ids"]] == [list(g.token_ids[:4]) for g in generate]
    rows = http.post("/v1/models/tiny:predict", json={
        "signature_name": "generate_ids",
        "instances": [{"token_ids": [5, 6, 7], "num_tokens": 3, "max_new_tokens": 4,
                       "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}]})
    assert rows.status_code == 200, rows.text
    expected = grpc_client.generate([5, 6, 7], max_new_tokens=4)
    assert rows.json()["predictions"][0]["token_ids"][:4] == list(expected.token_ids)


def test_rest_errors(http):
    cases = [
        ({"instances": ["a"], "signature_name": "nope"}, 400, "not found"),
        ({"inputs": {"wrong": ["a"]}}, 400, "expects inputs"),
        ({"instances": ["a"], "inputs": ["a"]}, 400, "only one of"),
        ({}, 400, "Missing"),
        ({"instances": [1, 2]}, 400, "expects strings"),
        ({"instances": [{"b64": "***"}]}, 400, "base64"),
        ({"signature_name": "generate_ids", "instances": [{"token_ids": [1, 2]}]}, 400,
         "expects inputs"),
        ({"signature_name": "generate_ids", "inputs": {
            "token_ids": [[1, 2], [3]], "num_tokens": [2, 1], "max_new_tokens": [1],
            "temperature": [0.0], "top_k": [0], "top_p": [1.0], "seed": [0]}}, 400, "input"),
    ]
    for body, code, words in cases:
        response = http.post("/v1/models/tiny:predict", json=body)
        assert response.status_code == code, (body, response.text)
        assert words in response.json()["error"], (body, response.text)
    assert http.post("/v1/models/tiny:predict", content=b"{not json").status_code == 400
    assert http.post("/v1/models/tiny/versions/9:predict",
                     json={"instances": ["a"]}).status_code == 404
    assert http.post("/v1/models/tiny/labels/stable:predict",
                     json={"instances": ["a"]}).status_code == 404
    assert http.post("/v1/models/tiny:classify", json={"examples": []}).status_code == 501


def test_health_tokenize_detokenize_metrics(http, lm):
    assert http.get("/health").json() == {"status": "SERVING"}
    tokens = http.post("/tokenize", json={"prompt": "hello"}).json()
    assert tokens["tokens"] == lm.tokenizer.encode("hello")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 128
    chat = http.post("/tokenize", json={"messages": CONVERSATION}).json()
    assert chat["tokens"] == lm.tokenizer.encode(rendered(CONVERSATION))
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {
        "prompt": "hello"}
    assert http.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400
    metrics = http.get("/metrics").text
    assert "keras_llm_generation_tokens_total" in metrics


# ----- versions, labels and reload ------------------------------------------

def test_version_policy_labels_and_reload(export_dir, tmp_path):
    base = tmp_path / "m"
    shutil.copytree(export_dir / "1", base / "1")
    shutil.copytree(export_dir / "1", base / "2")
    config = tmp_path / "models.config"
    config.write_text(
        "model_config_list {\n  config {\n"
        f'    name: "m" base_path: "{base}" model_platform: "tensorflow"\n'
        "    model_version_policy { specific { versions: 1 versions: 2 } }\n"
        '    version_labels { key: "stable" value: 1 }\n'
        '    version_labels { key: "canary" value: 2 }\n  }\n}\n')
    models = read_model_config(str(config))
    assert models["m"].policy == "specific" and models["m"].labels == {"stable": 1, "canary": 2}
    srv = Server(models, port=0, poll_seconds=0, rest_api_port=0,
                 engine_config=EngineConfig(max_slots=2, max_length=64, prompt_bucket=16))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.rest_api_port}",
                          timeout=TIMEOUT) as http:
            for label, version in (("stable", 1), ("canary", 2)):
                assert http.get(f"/v1/models/m/labels/{label}").json()[
                    "model_version_status"][0]["version"] == str(version)
                out = http.post(f"/v1/models/m/labels/{label}:predict",
                                json={"instances": ["he"]})
                assert out.status_code == 200, out.text
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "m"
        assert [s.version for s in stub.GetModelStatus(request, timeout=TIMEOUT)
                .model_version_status] == [1, 2]
        reload = model_management_pb2.ReloadConfigRequest()
        entry = reload.config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = "m", str(base), "tensorflow"
        assert stub.HandleReloadConfigRequest(reload, timeout=TIMEOUT).status.error_code == 0
        assert [s.version for s in stub.GetModelStatus(request, timeout=TIMEOUT)
                .model_version_status] == [2]
        channel.close()
    finally:
        srv.drain(0)


def test_tf_serving_docs_command_line(export_dir, tmp_path):
    """TF Serving's docs' command line (plus common flags) starts keras-llm serve."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import free_ports

    batching = tmp_path / "batching.pbtxt"
    batching.write_text("max_batch_size { value: 4 }\nbatch_timeout_micros { value: 0 }\n"
                        "max_enqueued_batches { value: 8 }\nnum_batch_threads { value: 2 }\n")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config {\n  enable: true,\n'
                          '  path: "/monitoring/prometheus/metrics"\n}\n')
    port, rest = free_ports(2)
    command = [sys.executable, "-m", "keras_llm.cli", "serve", f"--port={port}",
               f"--rest_api_port={rest}", "--model_name=tiny",
               f"--model_base_path={export_dir}", "--enable_batching",
               f"--batching_parameters_file={batching}",
               f"--monitoring_config_file={monitoring}", "--rest_api_timeout_in_ms=30000",
               "--file_system_poll_wait_seconds=0", "--tensorflow_intra_op_parallelism=1",
               "--tensorflow_inter_op_parallelism=1", "--grpc_channel_arguments=grpc.max_connection_idle_ms=60000",
               "--enable_model_warmup=true", "--num_load_threads=2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{rest}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        out = httpx.post(f"http://127.0.0.1:{rest}/v1/models/tiny:predict",
                         json={"instances": ["he"]}, timeout=TIMEOUT)
        assert out.status_code == 200 and out.json()["predictions"][0]["num_tokens"] == 16
        metrics = httpx.get(f"http://127.0.0.1:{rest}/monitoring/prometheus/metrics")
        assert metrics.status_code == 200 and "keras_llm_requests" in metrics.text
        with Client(f"127.0.0.1:{port}", timeout=TIMEOUT) as client:
            assert client.predict("tiny", ["he"])["num_tokens"][0] == 16
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--num_load_threads has no effect" in err
    events = [json.loads(line) for line in err.splitlines() if line.startswith('{"time"')]
    assert [e["event"] for e in events if e["event"] in ("serving", "stopped")] == [
        "serving", "stopped"]


# ----- malformed Predict tensors over gRPC ----------------------------------

def test_malformed_predict_tensors_are_refused_before_allocation(server):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def tensor(dtype, dims, **values):
        shape = tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
        return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, **values)

    good = {"token_ids": tf.make_tensor_proto(np.array([[5, 6]], np.int32)),
            "num_tokens": tf.make_tensor_proto(np.array([2], np.int32)),
            "max_new_tokens": tf.make_tensor_proto(np.array([2], np.int32)),
            "temperature": tf.make_tensor_proto(np.array([0.0], np.float32)),
            "top_k": tf.make_tensor_proto(np.array([0], np.int32)),
            "top_p": tf.make_tensor_proto(np.array([1.0], np.float32)),
            "seed": tf.make_tensor_proto(np.array([0], np.int32))}
    cases = {
        "unknown dtype enum": tensor(999, [1, 2], int_val=[1]),
        "expects int32": tensor(types_pb2.DT_INVALID, [1, 2]),
        "over the limit": tensor(types_pb2.DT_INT32, [1, 100_000_000], int_val=[1]),
        "negative dimension": tensor(types_pb2.DT_INT32, [1, -3], int_val=[1]),
        "tensor_content has": tensor(types_pb2.DT_INT32, [1, 2], tensor_content=b"\x00" * 7),
        "values for shape": tensor(types_pb2.DT_INT32, [1, 2], int_val=[1, 2, 3]),
    }
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    for words, bad in cases.items():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tiny"
        request.model_spec.signature_name = "generate_ids"
        for key, value in good.items():
            request.inputs[key].CopyFrom(value)
        request.inputs["token_ids"].CopyFrom(bad)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, words
        assert words in info.value.details(), (words, info.value.details())
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = "generate_ids"
    for key, value in good.items():
        request.inputs[key].CopyFrom(value)
    out = stub.Predict(request, timeout=TIMEOUT)
    assert tf.make_ndarray(out.outputs["num_tokens"]).tolist() == [2]
    channel.close()


def test_reflection_is_off_unless_enabled(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()
