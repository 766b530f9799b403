"""A hostile client against a real `keras-llm serve` on loopback: malformed
requests over gRPC and HTTP (named cases and seeded fuzz), overload past
capacity, a deadline storm, SIGTERM with streams running, kill -9 and
restart. Bounded in count and time; prints one JSON table.

    python -m benchmarks.reliability --model_base_path DIR --model_name NAME \\
        [--fuzz 100] [--slots 4] [--queue 4]

Each malformed request must get the expected status with a message, within
`--hang_s`, and the next good request must succeed; the server's RSS is
sampled throughout (peak against idle).
"""

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np

GOOD_PROMPT = "hello"


def rss_bytes(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The server's RSS every 20 ms while in a `with` block: `peak`."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Server:
    """`keras-llm serve` with gRPC and HTTP on free loopback ports."""

    def __init__(self, base, name, slots=4, queue=4, max_length=256, extra=()):
        from benchmarks.bench_serving import free_port  # pylint: disable=import-outside-toplevel
        self.name = name
        self.slots, self.queue = slots, queue
        self.port, self.rest = free_port(), free_port()
        self.command = [sys.executable, "-m", "keras_llm.cli", "serve", f"--port={self.port}",
                        f"--rest_api_port={self.rest}", f"--model_name={name}",
                        f"--model_base_path={os.path.join(base, name)}",
                        f"--max_slots={slots}", f"--max_queue={queue}",
                        f"--max_length={max_length}", "--file_system_poll_wait_seconds=0",
                        "--grace_period_s=60", *extra]
        self.target = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.rest}"
        self.proc = None

    def start(self, timeout=600):
        """Start and wait for SERVING; returns the seconds it took."""
        begin = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        threading.Thread(target=self._drain_log, daemon=True).start()
        while time.perf_counter() - begin < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - begin
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"not SERVING after {timeout} s")

    def _drain_log(self):
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=120):
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ----- requests -----------------------------------------------------------------

def _tensor(dtype, dims, **values):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2  # pylint: disable=import-outside-toplevel
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, **values)


def _ids_inputs(ids=((5, 6),), counts=(2,), new=2):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    batch = len(counts)
    return {"token_ids": tf.make_tensor_proto(np.array(ids, np.int32)),
            "num_tokens": tf.make_tensor_proto(np.array(counts, np.int32)),
            "max_new_tokens": tf.make_tensor_proto(np.full([batch], new, np.int32)),
            "temperature": tf.make_tensor_proto(np.zeros([batch], np.float32)),
            "top_k": tf.make_tensor_proto(np.zeros([batch], np.int32)),
            "top_p": tf.make_tensor_proto(np.ones([batch], np.float32)),
            "seed": tf.make_tensor_proto(np.zeros([batch], np.int32))}


def predict_request(name, signature="generate_ids", inputs=None, version=None, label=None,
                    output_filter=()):
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    for key, value in (inputs if inputs is not None else _ids_inputs()).items():
        request.inputs[key].CopyFrom(value)
    request.output_filter.extend(output_filter)
    return request


def grpc_cases(name):
    """(case, how to call it, expected status) for gRPC."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorflow.core.framework import types_pb2  # pylint: disable=import-outside-toplevel

    from keras_llm.serving.protos import generation_pb2  # pylint: disable=import-outside-toplevel
    bad, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    # Past the server's 8 MB message limit gRPC itself refuses: RESOURCE_EXHAUSTED.
    huge = grpc.StatusCode.RESOURCE_EXHAUSTED

    def with_input(key, value, **kw):
        inputs = _ids_inputs(**kw)
        inputs[key] = value
        return inputs

    def without(key):
        inputs = _ids_inputs()
        del inputs[key]
        return inputs

    predict = [
        ("unknown model", predict_request("nope"), missing),
        ("unknown version", predict_request(name, version=99), missing),
        ("unknown label", predict_request(name, label="canary"), missing),
        ("unknown signature", predict_request(name, "nope"), bad),
        ("missing input", predict_request(name, inputs=without("seed")), bad),
        ("extra input", predict_request(name, inputs={**_ids_inputs(), "x": tf.make_tensor_proto([1])}), bad),
        ("dtype enum 999", predict_request(name, inputs=with_input("token_ids", _tensor(999, [1, 2], int_val=[1]))), bad),
        ("dtype 0", predict_request(name, inputs=with_input("token_ids", _tensor(0, [1, 2]))), bad),
        ("wrong dtype", predict_request(name, inputs=with_input("token_ids", tf.make_tensor_proto(np.ones([1, 2], np.float32)))), bad),
        ("dims 1x100000000 with one value", predict_request(name, inputs=with_input("token_ids", _tensor(types_pb2.DT_INT32, [1, 100_000_000], int_val=[1]))), bad),
        ("negative dim", predict_request(name, inputs=with_input("token_ids", _tensor(types_pb2.DT_INT32, [-3], int_val=[1]))), bad),
        ("wrong-size tensor_content", predict_request(name, inputs=with_input("token_ids", _tensor(types_pb2.DT_INT32, [1, 2], tensor_content=b"\0" * 5))), bad),
        ("more values than the shape", predict_request(name, inputs=with_input("token_ids", _tensor(types_pb2.DT_INT32, [1, 2], int_val=[1, 2, 3]))), bad),
        ("rank 1 ids", predict_request(name, inputs=with_input("token_ids", tf.make_tensor_proto(np.array([5, 6], np.int32)))), bad),
        ("batch mismatch", predict_request(name, inputs=_ids_inputs(ids=((5, 6), (7, 8)), counts=(2, 2, 2))), bad),
        ("ids outside the vocabulary", predict_request(name, inputs=_ids_inputs(ids=((5, 10 ** 8),))), bad),
        ("negative ids", predict_request(name, inputs=_ids_inputs(ids=((-5, 6),))), bad),
        ("unknown output_filter", predict_request(name, output_filter=["nope"]), bad),
        ("batch of 1000 prompts", predict_request(name, "serving_default", inputs={"prompt": tf.make_tensor_proto(np.array([b"hi"] * 1000, dtype=object))}), bad),
        ("score past the context", predict_request(name, "score", inputs={"token_ids": tf.make_tensor_proto(np.ones([1, 9000], np.int32)), "num_tokens": tf.make_tensor_proto(np.array([9000], np.int32))}), bad),
        ("50 MB prompt", predict_request(name, "serving_default", inputs={"prompt": tf.make_tensor_proto(np.array([b"a" * (50 << 20)], dtype=object))}), huge),
        ("6 MB prompt", predict_request(name, "serving_default", inputs={"prompt": tf.make_tensor_proto(np.array([b"a" * (6 << 20)], dtype=object))}), bad),
        ("temperature NaN", predict_request(name, "generate", inputs={"prompt": tf.make_tensor_proto([GOOD_PROMPT]), "max_new_tokens": tf.make_tensor_proto(np.array([2], np.int32)), "temperature": tf.make_tensor_proto(np.array([np.nan], np.float32)), "top_k": tf.make_tensor_proto(np.array([0], np.int32)), "top_p": tf.make_tensor_proto(np.array([1.0], np.float32)), "seed": tf.make_tensor_proto(np.array([0], np.int32))}), bad),
        ("per-row inputs of the wrong count", predict_request(name, "generate", inputs={"prompt": tf.make_tensor_proto([GOOD_PROMPT] * 3), "max_new_tokens": tf.make_tensor_proto(np.array([2, 2], np.int32)), "temperature": tf.make_tensor_proto(np.array([0.0], np.float32)), "top_k": tf.make_tensor_proto(np.array([0], np.int32)), "top_p": tf.make_tensor_proto(np.array([1.0], np.float32)), "seed": tf.make_tensor_proto(np.array([0], np.int32))}), bad),
    ]
    cases = [(case, ("Predict", request), code) for case, request, code in predict]

    def generate(**fields):
        sampling = fields.pop("sampling", {})
        return generation_pb2.GenerateRequest(
            model_name=fields.pop("model_name", name),
            sampling=generation_pb2.SamplingOptions(**sampling), **fields)

    gen = [
        ("Generate: no prompt", generate(), bad),
        ("Generate: unknown model", generate(model_name="nope", text="hi"), missing),
        ("Generate: max_new_tokens -5", generate(text="hi", sampling={"max_new_tokens": -5}), bad),
        ("Generate: temperature NaN", generate(text="hi", sampling={"temperature": float("nan")}), bad),
        ("Generate: temperature inf", generate(text="hi", sampling={"temperature": float("inf")}), bad),
        ("Generate: top_p 2", generate(text="hi", sampling={"top_p": 2.0}), bad),
        ("Generate: top_k -1", generate(text="hi", sampling={"top_k": -1}), bad),
        ("Generate: empty stop string", generate(text="hi", sampling={"stop": [""]}), bad),
        ("Generate: negative stop id", generate(text="hi", sampling={"stop_ids": [-1]}), bad),
        ("Generate: ids outside the vocabulary", generate(ids=generation_pb2.TokenIds(ids=[10 ** 8])), bad),
        ("Generate: empty ids", generate(ids=generation_pb2.TokenIds(ids=[])), bad),
        ("Generate: too long for a slot", generate(text="hello " * 400), bad),
        ("Generate: 50 MB text", generate(text="a" * (50 << 20)), huge),
        ("Generate: 6 MB text", generate(text="a" * (6 << 20)), bad),
        ("Generate: bad role", generate(messages=[generation_pb2.ChatMessage(role="robot", content="x")]), bad),
        ("Generate: messages and text", generate(text="hi", messages=[generation_pb2.ChatMessage(role="user", content="x")]), bad),
    ]
    cases += [(case, ("Generate", request), code) for case, request, code in gen]
    # Bytes that are no GenerateRequest: invalid UTF-8 in `text`, then garbage.
    cases += [("Generate: invalid UTF-8", ("raw", b"\x12\x02\xff\xfe"), bad),
              ("Generate: undecodable bytes", ("raw", b"\xff\xff\xff\xff\x0f"), bad),
              ("Predict: undecodable bytes", ("raw-predict", b"\x0a\xff\xff\xff"), bad)]
    return cases


def call_grpc(channel, how, timeout):
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel

    from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc  # pylint: disable=import-outside-toplevel
    kind, request = how
    if kind == "Predict":
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
    elif kind == "Generate":
        list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout))
    elif kind == "raw":
        method = channel.unary_stream("/keras_llm.serving.Generation/Generate",
                                      request_serializer=None,
                                      response_deserializer=generation_pb2.GenerateResponse.FromString)
        list(method(request, timeout=timeout))
    else:
        channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                            request_serializer=None, response_deserializer=None)(
            request, timeout=timeout)
    return grpc.StatusCode.OK, ""


def http_cases(name):
    """(case, method, path, body bytes, expected HTTP status)."""
    big = json.dumps({"model": name, "prompt": "a" * (6 << 20)}).encode()
    j = lambda value: json.dumps(value).encode()  # noqa: E731
    msg = [{"role": "user", "content": "hi"}]
    chat = "/v1/chat/completions"
    done = "/v1/completions"
    predict = f"/v1/models/{name}:predict"
    return [
        ("chat: not JSON", "POST", chat, b"{nope", 400),
        ("chat: JSON array", "POST", chat, b"[1]", 400),
        ("chat: unknown model", "POST", chat, j({"model": "nope", "messages": msg}), 404),
        ("chat: no messages", "POST", chat, j({"model": name}), 400),
        ("chat: empty messages", "POST", chat, j({"model": name, "messages": []}), 400),
        ("chat: bad role", "POST", chat, j({"model": name, "messages": [{"role": "robot", "content": "x"}]}), 400),
        ("chat: content a number", "POST", chat, j({"model": name, "messages": [{"role": "user", "content": 5}]}), 400),
        ("chat: image part", "POST", chat, j({"model": name, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400),
        ("chat: n=2", "POST", chat, j({"model": name, "messages": msg, "n": 2}), 400),
        ("chat: temperature -1", "POST", chat, j({"model": name, "messages": msg, "temperature": -1}), 400),
        ("chat: temperature Infinity", "POST", chat, b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}' % name.encode(), 400),
        ("chat: temperature NaN", "POST", chat, b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % name.encode(), 400),
        ("chat: temperature a string", "POST", chat, j({"model": name, "messages": msg, "temperature": "hot"}), 400),
        ("chat: max_tokens 0", "POST", chat, j({"model": name, "messages": msg, "max_tokens": 0}), 400),
        ("chat: max_tokens past the context", "POST", chat, j({"model": name, "messages": msg, "max_tokens": 10 ** 6}), 400),
        ("chat: top_p 0", "POST", chat, j({"model": name, "messages": msg, "top_p": 0}), 400),
        ("chat: empty stop", "POST", chat, j({"model": name, "messages": msg, "stop": [""]}), 400),
        ("chat: stop a number", "POST", chat, j({"model": name, "messages": msg, "stop": 3}), 400),
        ("chat: top_logprobs 50", "POST", chat, j({"model": name, "messages": msg, "logprobs": True, "top_logprobs": 50}), 400),
        ("chat: presence_penalty", "POST", chat, j({"model": name, "messages": msg, "presence_penalty": 1}), 400),
        ("chat: tools", "POST", chat, j({"model": name, "messages": msg, "tools": [{"type": "function"}]}), 400),
        ("chat: seed 1.5", "POST", chat, j({"model": name, "messages": msg, "seed": 1.5}), 400),
        ("completions: no prompt", "POST", done, j({"model": name}), 400),
        ("completions: prompt a number", "POST", done, j({"model": name, "prompt": 5}), 400),
        ("completions: mixed list", "POST", done, j({"model": name, "prompt": ["a", 1]}), 400),
        ("completions: ids outside the vocabulary", "POST", done, j({"model": name, "prompt": [10 ** 8]}), 400),
        ("completions: echo with logprobs", "POST", done, j({"model": name, "prompt": "a", "echo": True, "logprobs": 1}), 400),
        ("completions: 6 MB prompt", "POST", done, big, 400),
        ("completions: 9 MB body", "POST", done, b" " * (9 << 20), 413),
        ("REST: not JSON", "POST", predict, b"{nope", 400),
        ("REST: no instances or inputs", "POST", predict, j({}), 400),
        ("REST: both forms", "POST", predict, j({"instances": ["a"], "inputs": ["a"]}), 400),
        ("REST: unknown signature", "POST", predict, j({"signature_name": "nope", "instances": ["a"]}), 400),
        ("REST: numbers for strings", "POST", predict, j({"instances": [1]}), 400),
        ("REST: bad base64", "POST", predict, j({"instances": [{"b64": "***"}]}), 400),
        ("REST: ragged ids", "POST", predict, j({"signature_name": "generate_ids", "inputs": {"token_ids": [[1, 2], [3]], "num_tokens": [2, 1], "max_new_tokens": [1], "temperature": [0.0], "top_k": [0], "top_p": [1.0], "seed": [0]}}), 400),
        ("REST: batch of 1000", "POST", predict, j({"instances": ["a"] * 1000}), 400),
        ("REST: unknown version", "POST", f"/v1/models/{name}/versions/99:predict", j({"instances": ["a"]}), 404),
        ("REST: unknown model", "POST", "/v1/models/nope:predict", j({"instances": ["a"]}), 404),
        ("REST: classify", "POST", f"/v1/models/{name}:classify", j({"examples": []}), 501),
        ("REST: unknown verb", "POST", f"/v1/models/{name}:explode", j({}), 404),
        ("tokenize: no prompt", "POST", "/tokenize", j({"model": name}), 400),
        ("detokenize: ids outside the vocabulary", "POST", "/detokenize", j({"model": name, "tokens": [10 ** 8]}), 400),
        ("detokenize: not a list", "POST", "/detokenize", j({"model": name, "tokens": "x"}), 400),
    ]


def _good(server, channel):
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel
    del channel
    with Client(server.target, timeout=60) as client:
        return client.generate(GOOD_PROMPT, max_new_tokens=2).finish_reason in ("stop", "length")


def malformed(server, hang_s=30.0, fuzz=0, seed=0):
    """Every case, then a good request; returns the table and the failures."""
    channel = grpc.insecure_channel(server.target, options=[
        ("grpc.max_send_message_length", 64 << 20)])
    rows, failures = [], []
    idle = rss_bytes(server.proc.pid)
    with RssSampler(server.proc.pid) as rss, httpx.Client(base_url=server.url,
                                                          timeout=hang_s) as http:
        for case, how, expected in grpc_cases(server.name) + fuzz_grpc(server.name, fuzz, seed):
            begin = time.perf_counter()
            try:
                code, message = call_grpc(channel, how, hang_s)
            except grpc.RpcError as error:
                code, message = error.code(), error.details() or ""
            rows.append(_row("grpc", case, expected, code, message, begin, server))
        for case, method, path, body, expected in (http_cases(server.name)
                                                   + fuzz_http(server.name, fuzz, seed)):
            begin = time.perf_counter()
            try:
                response = http.request(method, path, content=body)
                code = response.status_code
                message = response.text[:200]
            except httpx.TimeoutException:
                code, message = "hang", ""
            except httpx.HTTPError as error:
                code, message = "error", str(error)
            rows.append(_row("http", case, expected, code, message, begin, server))
        for row in rows:
            if not row["ok"]:
                failures.append(row)
        good = _good(server, channel) if server.alive() else False
    channel.close()
    return {"requests": len(rows), "wrong": sum(not r["ok"] for r in rows),
            "hangs": sum(r["got"] in ("hang", "DEADLINE_EXCEEDED") for r in rows),
            "crashed": not server.alive(), "good_after": good,
            "idle_rss_mb": idle / 2 ** 20, "peak_rss_mb": rss.peak / 2 ** 20,
            "peak_over_idle": rss.peak / idle if idle else None,
            "slowest_s": max(r["seconds"] for r in rows)}, failures


def _row(api, case, expected, got, message, begin, server):
    if isinstance(expected, (set, frozenset, tuple)):
        ok = got in expected
    else:
        ok = got == expected
    ok = ok and (got in (grpc.StatusCode.OK, 200) or bool(message)) and server.alive()
    name = lambda c: c.name if hasattr(c, "name") else c  # noqa: E731
    return {"api": api, "case": case, "expected": (sorted(map(str, map(name, expected)))
                                                   if isinstance(expected, (set, tuple))
                                                   else name(expected)),
            "got": name(got), "ok": ok, "message": message[:160],
            "seconds": round(time.perf_counter() - begin, 4)}


# ----- seeded fuzz ---------------------------------------------------------------

FUZZ_GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND}
FUZZ_HTTP_OK = {200, 400, 404, 413}


def fuzz_grpc(name, count, seed):
    """Random Predict tensors: shapes, dtypes, values and contents; each must
    answer OK, INVALID_ARGUMENT or NOT_FOUND, never hang or crash."""
    from tensorflow.core.framework import types_pb2  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    keys = ["token_ids", "num_tokens", "max_new_tokens", "temperature", "top_k", "top_p", "seed"]
    dtypes = [types_pb2.DT_INT32, types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_INT64,
              types_pb2.DT_BOOL, 0, 77, -1]
    cases = []
    for i in range(count):
        inputs = _ids_inputs()
        for key in rng.choice(keys, size=int(rng.integers(1, 3)), replace=False):
            dims = [int(d) for d in rng.choice([-1, 0, 1, 2, 3, 7, 10 ** 7], size=int(rng.integers(0, 4)))]
            dtype = int(rng.choice(dtypes))
            values = {}
            kind = int(rng.integers(0, 3))
            if kind == 0:
                values["int_val"] = [int(v) for v in rng.integers(-(2 ** 31), 2 ** 31 - 1, size=int(rng.integers(0, 5)))]
            elif kind == 1:
                values["float_val"] = [float(v) for v in rng.choice([np.nan, np.inf, -1.0, 0.5, 1e30], size=int(rng.integers(0, 4)))]
            else:
                values["tensor_content"] = rng.bytes(int(rng.integers(0, 17)))
            inputs[str(key)] = _tensor(dtype, dims, **values)
        signature = str(rng.choice(["generate_ids", "generate_ids", "score", "generate"]))
        cases.append((f"fuzz grpc {i}", ("Predict", predict_request(name, signature, inputs)),
                      FUZZ_GRPC_OK))
    return cases


def fuzz_http(name, count, seed):
    """Random JSON bodies for every route; each must answer 200, 400, 404 or
    413, never hang, never 5xx."""
    rng = np.random.default_rng(seed + 1)
    atoms = [None, True, -1, 0, 1, 2 ** 40, 0.5, float("nan"), "", "x", "hello", [], {}, [1, "a"],
             {"b64": "aGk="}, [[1, 2], [3]], "\ud800"]
    fields = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed",
              "stop", "stream", "logprobs", "top_logprobs", "n", "echo", "instances", "inputs",
              "signature_name", "tokens", "stream_options"]
    paths = ["/v1/chat/completions", "/v1/completions", f"/v1/models/{name}:predict",
             "/tokenize", "/detokenize"]
    cases = []
    for i in range(count):
        body = {"model": name} if rng.random() < 0.8 else {}
        for field in rng.choice(fields, size=int(rng.integers(1, 6)), replace=False):
            body[str(field)] = atoms[int(rng.integers(0, len(atoms)))]
        if "stream" in body:
            body["stream"] = False  # a stream answers 200 before it can fail
        try:
            raw = json.dumps(body).encode("utf-8", errors="surrogatepass")
        except ValueError:
            raw = b"{}"
        cases.append((f"fuzz http {i}", "POST", str(rng.choice(paths)), raw, FUZZ_HTTP_OK))
    return cases


# ----- load ---------------------------------------------------------------------

def overload(server, factor, new_tokens=64):
    """`factor` x capacity (slots + queue) streams at once; health probed every
    50 ms throughout."""
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # pylint: disable=import-outside-toplevel
    count = factor * (server.slots + server.queue)
    health_latency, stop = [], threading.Event()

    def probe():
        channel = grpc.insecure_channel(server.target)
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            begin = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                health_latency.append(time.perf_counter() - begin)
            except grpc.RpcError:
                health_latency.append(float("inf"))
            stop.wait(0.05)
        channel.close()

    def one(i):
        begin = time.perf_counter()
        with Client(server.target, timeout=300) as client:
            try:
                summary = client.generate(GOOD_PROMPT, max_new_tokens=new_tokens,
                                          ignore_eos=True, seed=i)
                return "ok" if summary.generated_tokens == new_tokens else "short", \
                    time.perf_counter() - begin
            except grpc.RpcError as error:
                return error.code().name, time.perf_counter() - begin

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    stop.set()
    prober.join()
    rejected = [s for code, s in results if code == "RESOURCE_EXHAUSTED"]
    return {"factor": factor, "requests": count,
            "ok": sum(code == "ok" for code, _ in results),
            "resource_exhausted": len(rejected),
            "other_errors": sum(code not in ("ok", "RESOURCE_EXHAUSTED") for code, _ in results),
            "slowest_rejection_s": max(rejected, default=0.0),
            "health_checks": len(health_latency),
            "slowest_health_s": max(health_latency, default=0.0)}


def deadline_storm(server, count=32, deadline_s=0.03):
    """Streams whose deadline passes while they wait: they must leave the
    queue at once (the waiting gauge back to 0), and service go on."""
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel

    def one(i):
        with Client(server.target, timeout=deadline_s) as client:
            try:
                client.generate(GOOD_PROMPT, max_new_tokens=64, ignore_eos=True, seed=i)
                return "ok"
            except grpc.RpcError as error:
                return error.code().name

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        codes = list(pool.map(one, range(count)))
    begin, waiting = time.perf_counter(), None
    while time.perf_counter() - begin < 10:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        waiting = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("keras_llm_requests_waiting{"))
        if waiting == 0:
            break
        time.sleep(0.05)
    return {"requests": count, "codes": {c: codes.count(c) for c in sorted(set(codes))},
            "waiting_after": waiting,
            "queue_empty_s": round(time.perf_counter() - begin, 3),
            "good_after": _good(server, None)}


def sigterm_with_streams(server, streams=4, new_tokens=64):
    """SIGTERM while streams run: each finishes, then the server exits 0."""
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel
    started = threading.Barrier(streams + 1)

    def one(i):
        with Client(server.target, timeout=300) as client:
            count = 0
            for response in client.stream_responses(GOOD_PROMPT, max_new_tokens=new_tokens,
                                                    ignore_eos=True, seed=i):
                if response.HasField("delta") and count == 0:
                    started.wait()
                count += 1
                if response.HasField("summary"):
                    return response.summary.generated_tokens
        return 0

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(one, i) for i in range(streams)]
        started.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        tokens = [f.result(timeout=300) for f in futures]
    code = server.proc.wait(120)
    return {"streams": streams, "finished": sum(t == new_tokens for t in tokens),
            "exit_code": code}


def soak(server, streams=64, seconds=600, new_tokens=32):
    """`streams` clients asking back to back for `seconds`: errors, time to
    first token and inter-token latency percentiles, RSS after a warm-up
    minute (or a tenth of the run) against the end."""
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel
    end = time.perf_counter() + seconds
    warm_at = time.perf_counter() + min(60.0, seconds / 10)
    ttft, itl, errors, done = [], [], [], [0]
    rss = {"warm": None}
    lock = threading.Lock()

    def worker(i):
        with Client(server.target, timeout=300) as client:
            while time.perf_counter() < end:
                begin = last = time.perf_counter()
                first = True
                try:
                    for response in client.stream_responses(GOOD_PROMPT, max_new_tokens=new_tokens,
                                                            ignore_eos=True, seed=i):
                        if response.HasField("delta") and response.delta.token_ids:
                            now = time.perf_counter()
                            with lock:
                                (ttft if first else itl).append(now - (begin if first else last))
                            first, last = False, now
                    with lock:
                        done[0] += 1
                except grpc.RpcError as error:
                    with lock:
                        errors.append(error.code().name)
                if rss["warm"] is None and time.perf_counter() > warm_at:
                    rss["warm"] = rss_bytes(server.proc.pid)

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        list(pool.map(worker, range(streams)))
    final = rss_bytes(server.proc.pid)
    pct = lambda values, q: float(np.percentile(values, q)) if values else None  # noqa: E731
    return {"streams": streams, "seconds": seconds, "requests": done[0],
            "errors": len(errors), "error_codes": sorted(set(errors)),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "rss_warm_mb": (rss["warm"] or final) / 2 ** 20, "rss_end_mb": final / 2 ** 20,
            "rss_growth": final / (rss["warm"] or final) - 1}


def hot_reload(export_base, name, budget_factor=1.5, streams=8, new_tokens=16):
    """A new version appears while `streams` clients ask back to back, on a
    server whose reload memory budget is `budget_factor` x its RSS once
    serving (so two versions do not fit beside each other): requests that
    failed, the server's peak RSS against the budget, and how long the swap
    took. The versions are symbolic links to the export's first version, in
    a directory of their own (the export is not touched)."""
    import tempfile  # pylint: disable=import-outside-toplevel

    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel
    source = os.path.join(export_base, name)
    first = os.path.join(source, min(v for v in os.listdir(source) if v.isdigit()))
    with tempfile.TemporaryDirectory(prefix="keras-llm-reload-") as base:
        os.makedirs(os.path.join(base, name))
        os.symlink(first, os.path.join(base, name, "1"))
        probe = Server(base, name, extra=("--file_system_poll_wait_seconds=0.5",))
        probe.start()
        budget = int(rss_bytes(probe.proc.pid) * budget_factor)
        probe.stop()
        server = Server(base, name, extra=("--file_system_poll_wait_seconds=0.5",
                                           f"--reload_memory_budget_mb={budget / 2**20:.0f}"))
        server.start()
        stop, codes, lock = threading.Event(), [], threading.Lock()

        def worker(i):
            with Client(server.target, timeout=300) as client:
                while not stop.is_set():
                    try:
                        client.generate(GOOD_PROMPT, max_new_tokens=new_tokens,
                                        ignore_eos=True, seed=i)
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                    with lock:
                        codes.append(code)

        def version():  # 0 between versions (the old one retired, the new one loading)
            status = httpx.get(f"{server.url}/v1/models/{name}", timeout=10).json()
            return max((int(v["version"]) for v in status.get("model_version_status", ())),
                       default=0)

        try:
            with RssSampler(server.proc.pid) as rss, \
                    concurrent.futures.ThreadPoolExecutor(streams) as pool:
                workers = [pool.submit(worker, i) for i in range(streams)]
                try:
                    time.sleep(3.0)
                    begin = time.perf_counter()
                    os.symlink(first, os.path.join(base, name, "2"))
                    while version() != 2 and time.perf_counter() - begin < 600:
                        time.sleep(0.1)
                    swap_s = time.perf_counter() - begin
                    time.sleep(3.0)
                finally:
                    stop.set()
                for future in workers:
                    future.result()
        finally:
            stop.set()
            server.stop()
    return {"requests": len(codes), "failed": sum(c != "OK" for c in codes),
            "codes": sorted(set(codes)), "serving_version": 2 if swap_s < 600 else 1,
            "swap_s": round(swap_s, 2), "peak_rss_mb": round(rss.peak / 2**20),
            "budget_mb": round(budget / 2**20), "under_budget": rss.peak <= budget}


def kill_and_restart(server):
    server.stop(signal.SIGKILL)
    return {"serving_after_restart_s": round(server.start(), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_base_path", required=True)
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--fuzz", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang_s", type=float, default=30.0)
    parser.add_argument("--reload", action="store_true",
                        help="also swap in a new version under load within a memory budget "
                             "of 1.5x the serving RSS")
    parser.add_argument("--soak_s", type=float, default=0.0,
                        help="also soak 64 streams for this long (a server with 16 slots and "
                             "a 64-place queue; 600 for the 10-minute soak)")
    args = parser.parse_args(argv)
    server = Server(args.model_base_path, args.model_name, args.slots, args.queue)
    report = {"serving_s": round(server.start(), 2)}
    try:
        report["malformed"], failures = malformed(server, args.hang_s, args.fuzz, args.seed)
        report["malformed_failures"] = failures
        report["overload"] = [overload(server, factor) for factor in (2, 4)]
        report["deadline_storm"] = deadline_storm(server)
        report["kill_and_restart"] = kill_and_restart(server)
        report["sigterm"] = sigterm_with_streams(server)
    finally:
        server.stop()
    if args.reload:
        report["hot_reload"] = hot_reload(args.model_base_path, args.model_name)
    if args.soak_s:
        server = Server(args.model_base_path, args.model_name, 16, 64)
        server.start()
        try:
            report["soak"] = soak(server, 64, args.soak_s)
        finally:
            server.stop()
    print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
