"""`keras-llm serve`: TF Serving's gRPC API plus streaming generation.

    keras-llm serve --port 8500 --model_name NAME --model_base_path DIR

Serves the latest version under `DIR` (as `tensorflow_model_server` does):
`tensorflow.serving.PredictionService` (`Predict` on any exported
signature, `GetModelMetadata`; `Classify`, `Regress` and `MultiInference`
answer UNIMPLEMENTED), `tensorflow.serving.ModelService/GetModelStatus`,
keras-llm's `Generation/Generate` stream (see `serving/protos`), and the
standard `grpc.health.v1` health service (SERVING once warmed up).
"""

import argparse
import concurrent.futures
import json
import logging
import os
import re
import signal
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from keras_llm.runtime.params import SamplingParams
from keras_llm.serving.engine import EngineConfig, EngineStopped, ExportedModel, InvalidRequest, QueueFull
from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc

LOG = logging.getLogger("keras_llm.serving")


def latest_version(base_path):
    versions = [int(n) for n in os.listdir(base_path)
                if n.isdigit() and os.path.isfile(os.path.join(base_path, n, "saved_model.pb"))]
    if not versions:
        raise FileNotFoundError(f"no SavedModel versions under {base_path}")
    return max(versions)


class ServedModel:
    """One loaded version: the engine (generation) and the signatures (Predict)."""

    def __init__(self, name, base_path, version, engine_config):
        self.name = name
        self.version = version
        self.path = os.path.join(base_path, str(version))
        self.engine = ExportedModel(self.path, engine_config)
        from tensorflow.python.saved_model import loader_impl  # pylint: disable=import-outside-toplevel
        self.signature_defs = loader_impl.parse_saved_model(self.path).meta_graphs[0].signature_def
        # What Predict checks requests against, read from the SavedModel's proto.
        self.input_specs = {
            key: {name: tf.TensorSpec(tf.TensorShape(info.tensor_shape), tf.as_dtype(info.dtype))
                  for name, info in definition.inputs.items()}
            for key, definition in self.signature_defs.items()}


class Servables:
    """The models the server answers for, by name; swapped atomically on reload."""

    def __init__(self):
        self.models = {}
        self.lock = threading.Lock()

    def lookup(self, name):
        with self.lock:
            return self.models.get(name)

    def get(self, context, model_spec):
        name = model_spec.name
        model = self.lookup(name)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {name!r}")
        if model_spec.HasField("version") and model_spec.version.value != model.version:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: {name!r} version "
                          f"{model_spec.version.value}")
        if model_spec.version_label:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"version label {model_spec.version_label!r} is not assigned")
        return model


class ModelManager:
    """Loads the latest version of each model and follows new ones.

    A new version directory (export writes it atomically) is loaded and warmed
    while the old version keeps answering; then new requests go to it, and the
    old version finishes what it runs and is retired.
    """

    def __init__(self, servables, models, engine_config, poll_seconds=1.0):
        self.servables = servables
        self.base_paths = dict(models)  # name -> base path
        self.engine_config = engine_config
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = None

    def load_all(self):
        for name, base in self.base_paths.items():
            self._load(name, base, latest_version(base))

    def _load(self, name, base, version):
        start = time.perf_counter()
        model = ServedModel(name, base, version, self.engine_config)
        model.engine.warmup()
        with self.servables.lock:
            old = self.servables.models.get(name)
            self.servables.models[name] = model
        log_event("model_loaded", model=name, version=version,
                  seconds=round(time.perf_counter() - start, 2),
                  kv_cache_slots=model.engine.num_slots,
                  kv_cache_bytes_per_slot=model.engine.bytes_per_slot,
                  context=model.engine.max_length)
        if old is not None:
            old.engine.stop()
            log_event("model_retired", model=name, version=old.version)

    def start_polling(self):
        if self.poll_seconds <= 0:
            return
        self._thread = threading.Thread(target=self._poll, name="keras-llm-versions", daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            for name, base in self.base_paths.items():
                try:
                    newest = latest_version(base)
                    current = self.servables.lookup(name)
                    if current is None or newest > current.version:
                        self._load(name, base, newest)
                except Exception as error:  # pylint: disable=broad-except
                    log_event("model_load_failed", model=name, error=str(error))

    def stop(self):
        self._stop.set()


def log_event(event, **fields):
    LOG.info(json.dumps({"time": round(time.time(), 3), "event": event, **fields},
                        ensure_ascii=False))


# Generation signatures that Predict answers through the engine (batched with
# every other request); the SavedModel computes the same outputs on its own.
ENGINE_SIGNATURES = ("serving_default", "generate", "generate_ids")


def _rows(value, batch, dtype):
    value = np.asarray(value, dtype).reshape(-1)
    if value.size not in (1, batch):
        raise InvalidRequest(f"per-row inputs must have 1 or {batch} values, got {value.size}")
    return np.broadcast_to(value, (batch,))


def predict_with_engine(loaded, name, inputs, context):
    """A generation signature's outputs, computed by the engine: the same
    tokens the SavedModel's own decode loop gives (stop ids only, greedy
    unless the request samples), padded as its outputs are."""
    meta = loaded.metadata
    most = int(meta["max_new_tokens"])
    pad = meta["tokenizer"]["pad_id"]
    pad = 0 if pad is None else int(pad)
    try:
        if name == "generate_ids":
            ids, counts = inputs["token_ids"], inputs["num_tokens"].reshape(-1)
            if ids.ndim != 2 or len(counts) != ids.shape[0]:
                raise InvalidRequest("token_ids must be [batch, length] with one num_tokens per row")
            prompts = [ids[row, :max(int(n), 0)].tolist() for row, n in enumerate(counts)]
        else:
            chat = meta.get("chat_applied_in_graph", False)
            prompts = [loaded.encode(t.decode("utf-8", errors="replace"), chat=chat)
                       for t in inputs["prompt"].reshape(-1)]
        batch = len(prompts)
        if name == "serving_default":
            new, temperature = np.full([batch], most), np.zeros([batch])
            top_k, top_p, seed = np.zeros([batch]), np.ones([batch]), np.zeros([batch])
        else:
            new = np.clip(_rows(inputs["max_new_tokens"], batch, np.int64), 0, most)
            temperature = _rows(inputs["temperature"], batch, np.float64)
            top_k = _rows(inputs["top_k"], batch, np.int64)
            top_p = _rows(inputs["top_p"], batch, np.float64)
            seed = _rows(inputs["seed"], batch, np.int64)
        jobs = []
        for row, prompt in enumerate(prompts):
            p = float(top_p[row])
            params = SamplingParams(max_new_tokens=int(new[row]),
                                    temperature=max(float(temperature[row]), 0.0),
                                    top_k=max(int(top_k[row]), 0),
                                    top_p=p if 0.0 < p <= 1.0 else 1.0, seed=int(seed[row]))
            jobs.append(loaded.engine.submit(prompt, params, text=False))
    except InvalidRequest as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    except QueueFull as error:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    except EngineStopped as error:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
    context.add_callback(lambda: [job.cancel() for job in jobs])
    for job in jobs:
        job.done.wait()
    if any(job.result.finish_reason == "error" for job in jobs):
        context.abort(grpc.StatusCode.INTERNAL, "generation failed")
    width = max(int(new.max()) if batch else 1, 1)
    tokens = np.full([batch, width], pad, np.int32)
    for row, job in enumerate(jobs):
        tokens[row, :len(job.result.token_ids)] = job.result.token_ids
    outputs = {"token_ids": tokens,
               "num_tokens": np.array([len(j.result.token_ids) for j in jobs], np.int32)}
    if name != "generate_ids":
        outputs["text"] = np.array([loaded.tokenizer.decode(j.result.token_ids).encode("utf-8")
                                    for j in jobs], dtype=object)
    return outputs


def result_summary(result):
    """A `Result` as the fields of the Generate stream's `Summary`."""
    return {"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "generated_tokens": len(result.token_ids), "queue_s": result.queue_s,
            "time_to_first_token_s": result.time_to_first_token_s, "total_s": result.total_s,
            "text": result.text, "token_ids": list(result.token_ids)}


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servables):
        self.servables = servables

    def Predict(self, request, context):
        model = self.servables.get(context, request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        if name not in model.input_specs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Serving signature key \"{name}\" not found.")
        spec = model.input_specs[name]
        if set(request.inputs) != set(spec):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"signature {name} expects inputs {sorted(spec)}, got "
                          f"{sorted(request.inputs)}")
        inputs = {}
        for key, proto in request.inputs.items():
            if proto.dtype != spec[key].dtype.as_datatype_enum:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input {key}: expects {spec[key].dtype.name}, got "
                              f"{tf.dtypes.as_dtype(proto.dtype).name}")
            value = tf.make_ndarray(proto)
            if not spec[key].shape.is_compatible_with(value.shape):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input {key}: shape {list(value.shape)} does not match "
                              f"{spec[key].shape}")
            inputs[key] = value
        if name in ENGINE_SIGNATURES:
            outputs = predict_with_engine(model.engine, name, inputs, context)
        else:
            try:
                function = model.engine.signatures[name]  # loads the SavedModel on first use
                outputs = {k: v.numpy() for k, v in function(
                    **{k: tf.constant(v) for k, v in inputs.items()}).items()}
            except tf.errors.InvalidArgumentError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message.splitlines()[0])
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = name
        wanted = set(request.output_filter) or set(outputs)
        unknown = wanted - set(outputs)
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"output_filter names unknown outputs {sorted(unknown)}")
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
        return response

    def GetModelMetadata(self, request, context):
        model = self.servables.get(context, request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "metadata_field must be exactly ['signature_def']")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in model.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def _unimplemented(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "keras-llm serves generation models: use Predict or the Generation service")

    Classify = Regress = MultiInference = _unimplemented


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, servables):
        self.servables = servables

    def GetModelStatus(self, request, context):
        model = self.servables.get(context, request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = model.version
        status.state = (get_model_status_pb2.ModelVersionStatus.AVAILABLE
                        if model.engine.ready.is_set()
                        else get_model_status_pb2.ModelVersionStatus.LOADING)
        return response


class Metrics:
    """Prometheus metrics of the generation service (seconds, tokens, requests)."""

    def __init__(self, servables):
        import prometheus_client as prom  # pylint: disable=import-outside-toplevel

        self.registry = prom.CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        kw = dict(registry=self.registry, labelnames=["model"])
        self.ttft = prom.Histogram("keras_llm_time_to_first_token_seconds",
                                   "Time from request to its first token", buckets=buckets, **kw)
        self.itl = prom.Histogram("keras_llm_inter_token_latency_seconds",
                                  "Time between consecutive tokens of a request",
                                  buckets=buckets, **kw)
        self.e2e = prom.Histogram("keras_llm_e2e_request_latency_seconds",
                                  "Time from request to its last token", buckets=buckets, **kw)
        self.queue = prom.Histogram("keras_llm_queue_time_seconds",
                                    "Time a request waited for a slot", buckets=buckets, **kw)
        self.prompt_tokens = prom.Counter("keras_llm_prompt_tokens", "Prompt tokens", **kw)
        self.generated_tokens = prom.Counter("keras_llm_generation_tokens", "Generated tokens", **kw)
        self.requests = prom.Counter("keras_llm_requests", "Finished generation requests",
                                     registry=self.registry, labelnames=["model", "finish_reason"])
        running = prom.Gauge("keras_llm_requests_running", "Requests in a sequence slot", **kw)
        waiting = prom.Gauge("keras_llm_requests_waiting", "Requests waiting for a slot", **kw)
        self._gauges = (running, waiting)
        self._servables = servables

    def track(self, name):
        """Make the running/waiting gauges follow the current version of `name`."""
        running, waiting = self._gauges

        def stat(key):
            model = self._servables.lookup(name)
            return model.engine.stats()[key] if model else 0

        running.labels(name).set_function(lambda: stat("running"))
        waiting.labels(name).set_function(lambda: stat("waiting"))

    def observe(self, name, summary, gaps):
        self.ttft.labels(name).observe(summary["time_to_first_token_s"])
        self.e2e.labels(name).observe(summary["total_s"])
        self.queue.labels(name).observe(summary["queue_s"])
        for gap in gaps:
            self.itl.labels(name).observe(gap)
        self.prompt_tokens.labels(name).inc(summary["prompt_tokens"])
        self.generated_tokens.labels(name).inc(summary["generated_tokens"])
        self.requests.labels(name, summary["finish_reason"]).inc()


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, servables, metrics=None):
        self.servables = servables
        self.metrics = metrics

    def _submit(self, request, context):
        """Submit to the current version of the model; a version retired in
        between is retried on its successor, so a reload fails no request."""
        for _ in range(5):
            with self.servables.lock:
                models = dict(self.servables.models)
            name = request.model_name or (next(iter(models)) if len(models) == 1 else "")
            if name not in models:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {name!r}")
            engine = models[name].engine
            which = request.WhichOneof("prompt")
            if which == "ids":
                prompt_ids = list(request.ids.ids)
            elif which == "text":
                prompt_ids = engine.encode(request.text, chat=request.chat,
                                           system=request.system)
            else:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a prompt as text or ids")
            o = request.sampling
            sampling = SamplingParams(
                max_new_tokens=o.max_new_tokens or engine.config.default_max_new_tokens,
                temperature=o.temperature, top_k=o.top_k, top_p=o.top_p or 1.0, seed=o.seed,
                stop=tuple(o.stop), stop_ids=tuple(o.stop_ids), ignore_eos=o.ignore_eos)
            try:
                return name, engine.engine.submit(prompt_ids, sampling)
            except InvalidRequest as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            except QueueFull as error:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            except EngineStopped:
                time.sleep(0.05)
        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return None

    def Generate(self, request, context):
        name, job = self._submit(request, context)
        context.add_callback(job.cancel)  # client gone or deadline passed
        gaps, last = [], None
        while True:
            event = job.events.get()
            if event[0] == "delta":
                now = time.perf_counter()
                if last is not None and event[2]:
                    gaps.append(now - last)
                if event[2]:
                    last = now
                yield generation_pb2.GenerateResponse(
                    delta=generation_pb2.Delta(text=event[1], token_ids=event[2]))
            else:
                summary = result_summary(event[1])
                if self.metrics is not None:
                    self.metrics.observe(name, summary, gaps)
                log_event("request", model=name, finish_reason=summary["finish_reason"],
                          prompt_tokens=summary["prompt_tokens"],
                          generated_tokens=summary["generated_tokens"],
                          queue_s=round(summary["queue_s"], 4),
                          ttft_s=round(summary["time_to_first_token_s"], 4),
                          total_s=round(summary["total_s"], 4))
                yield generation_pb2.GenerateResponse(summary=generation_pb2.Summary(**summary))
                return


HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService",
                   "tensorflow.serving.ModelService", "keras_llm.serving.Generation")


class Server:
    """A running keras-llm server.

    Args:
        models: dict name -> base path (the directory holding version dirs).
        port: gRPC port (0 picks a free one); `self.port` is the bound one.
        host: address to bind; loopback unless told otherwise.
        engine_config: `EngineConfig` for every model.
        metrics_port: serve Prometheus metrics over HTTP on this port (None: off).
        poll_seconds: how often to look for new versions (0: never).
        profiler_port: start TensorFlow's profiler server on this port.
    """

    def __init__(self, models, port=8500, host="127.0.0.1", engine_config=None,
                 metrics_port=None, poll_seconds=1.0, profiler_port=None, max_workers=64):
        from grpc_reflection.v1alpha import reflection  # pylint: disable=import-outside-toplevel

        self.servables = Servables()
        self.manager = ModelManager(self.servables, models, engine_config or EngineConfig(),
                                    poll_seconds)
        self.metrics = Metrics(self.servables)
        self.grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
                                options=[("grpc.max_send_message_length", 64 << 20),
                                         ("grpc.max_receive_message_length", 64 << 20)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.servables), self.grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self.servables), self.grpc)
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationService(self.servables, self.metrics), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*HEALTH_SERVICES[1:], health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        self.host = host
        self.metrics_port = None
        if metrics_port is not None:
            import prometheus_client as prom  # pylint: disable=import-outside-toplevel

            self._metrics_server, _ = prom.start_http_server(metrics_port, addr=host,
                                                             registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        if profiler_port:
            tf.profiler.experimental.server.start(profiler_port)
        self.grpc.start()
        self.manager.load_all()
        for name in models:
            self.metrics.track(name)
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.manager.start_polling()
        log_event("serving", models=sorted(models), host=host, port=self.port,
                  metrics_port=self.metrics_port)

    def drain(self, grace_seconds=30.0):
        """SIGTERM: stop taking work, finish running requests, then stop."""
        self.health.enter_graceful_shutdown()
        self.manager.stop()
        with self.servables.lock:
            models = list(self.servables.models.values())
        for model in models:
            model.engine.stop(timeout=grace_seconds)
        self.grpc.stop(grace_seconds).wait()
        if self.metrics_port is not None:
            self._metrics_server.shutdown()
        log_event("stopped")


def read_model_config(path):
    """Models of a TF Serving `--model_config_file` (text ModelServerConfig)."""
    from google.protobuf import text_format  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.config import model_server_config_pb2  # pylint: disable=import-outside-toplevel

    with open(path, encoding="utf-8") as handle:
        config = text_format.Parse(handle.read(), model_server_config_pb2.ModelServerConfig())
    return {c.name: c.base_path for c in config.model_config_list.config}


def read_batching_parameters(path, config):
    """Apply a TF Serving batching parameters file to the engine's limits:
    `max_batch_size` -> sequence slots, `max_enqueued_batches` -> queue."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    values = dict(re.findall(r"^\s*(\w+)\s*\{\s*value:\s*(\d+)\s*\}", text, flags=re.M))
    if "max_batch_size" in values:
        config.max_slots = int(values["max_batch_size"])
    if "max_enqueued_batches" in values:
        config.max_queue = int(values["max_enqueued_batches"])
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-llm serve",
                                     description="Serve keras-llm exports over gRPC.")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; 0.0.0.0 for all)")
    parser.add_argument("--model_name")
    parser.add_argument("--model_base_path")
    parser.add_argument("--model_config_file", help="TF Serving model config (several models)")
    parser.add_argument("--batching_parameters_file")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    parser.add_argument("--max_slots", type=int, default=None)
    parser.add_argument("--max_queue", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=1024,
                        help="tokens per sequence slot (prompt bucket + new tokens)")
    parser.add_argument("--engine_backend", choices=("auto", "litert", "saved_model"),
                        default="auto",
                        help="decode with the export's LiteRT file when it has one (auto), "
                             "always (litert) or with its XLA functions (saved_model)")
    parser.add_argument("--num_threads", type=int, default=0,
                        help="LiteRT threads (0: every core)")
    parser.add_argument("--kv_cache_bytes", type=int, default=0,
                        help="memory budget of the KV cache per model (0: max_slots slots)")
    parser.add_argument("--metrics_port", type=int, default=None)
    parser.add_argument("--profiler_port", type=int, default=None)
    parser.add_argument("--grace_period_s", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model_config_file:
        models = read_model_config(args.model_config_file)
    elif args.model_name and args.model_base_path:
        models = {args.model_name: args.model_base_path}
    else:
        parser.error("give --model_name and --model_base_path, or --model_config_file")
    config = EngineConfig(max_length=args.max_length, memory_budget_bytes=args.kv_cache_bytes,
                          backend=args.engine_backend, num_threads=args.num_threads)
    if args.batching_parameters_file:
        read_batching_parameters(args.batching_parameters_file, config)
    if args.max_slots:
        config.max_slots = args.max_slots
    if args.max_queue:
        config.max_queue = args.max_queue
    server = Server(models, args.port, args.host, config, metrics_port=args.metrics_port,
                    poll_seconds=args.file_system_poll_wait_seconds,
                    profiler_port=args.profiler_port)
    print(f"keras-llm serving {', '.join(sorted(models))} on {args.host}:{server.port}",
          flush=True)
    done = threading.Event()

    def on_signal(*_):
        threading.Thread(target=lambda: (server.drain(args.grace_period_s), done.set()),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    return 0
