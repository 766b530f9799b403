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
import ctypes
import dataclasses
import hmac
import json
import logging
import os
import re
import signal
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keras_llm.runtime.params import SamplingParams
from keras_llm.runtime.speculative import SPECULATIVE_TOKENS
from keras_llm.serving import tensors
from keras_llm.serving.engine import EngineConfig, EngineStopped, ExportedModel, InvalidRequest, QueueFull
from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc, tf_serving

LOG = logging.getLogger("keras_llm.serving")


def list_versions(base_path):
    """Version numbers under `base_path` that hold a SavedModel, ascending."""
    return sorted(int(n) for n in os.listdir(base_path)
                  if n.isdigit() and os.path.isfile(os.path.join(base_path, n, "saved_model.pb")))


def latest_version(base_path):
    versions = list_versions(base_path)
    if not versions:
        raise FileNotFoundError(f"no SavedModel versions under {base_path}")
    return versions[-1]


@dataclasses.dataclass
class ModelSpec:
    """One model of the server's config (TF Serving's `ModelConfig`).

    Args:
        base_path: the directory holding version directories.
        policy: "latest" (the newest `num_versions`), "all", or "specific"
            (`versions`), as `model_version_policy`.
        labels: `version_labels`, label -> version.
    """

    base_path: str
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple = ()
    labels: dict = dataclasses.field(default_factory=dict)

    def wanted(self):
        available = list_versions(self.base_path)
        if self.policy == "all":
            return available
        if self.policy == "specific":
            return [v for v in available if v in self.versions]
        return available[-max(self.num_versions, 1):]


class ServedModel:
    """One loaded version: the engine (generation) and the signatures (Predict)."""

    def __init__(self, name, base_path, version, engine_config):
        self.name = name
        self.version = version
        self.created = time.time()
        self.path = os.path.join(base_path, str(version))
        self.engine = ExportedModel(self.path, engine_config)
        # What Predict checks requests against, read from the SavedModel's
        # proto without TensorFlow (an engine on LiteRT never imports it).
        self.signature_defs = tensors.read_signature_defs(self.path)
        self.input_specs = tensors.input_specs(self.signature_defs)


class ServingError(Exception):
    """A request that fails with a status: gRPC aborts with `code`, HTTP
    answers the matching status (`serving.http`)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


# Longest a request waits for a model whose old version was retired before its
# new one loaded (`--version_transition resource`).
REPLACE_WAIT_S = 120.0


def process_rss_bytes():
    """This process's resident memory."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Servables:
    """The models the server answers for; swapped atomically on reload.

    `models`: name -> the newest loaded version (what a request that names
    no version gets); `versions`: name -> {version: ServedModel};
    `labels`: name -> {label: version}.
    """

    def __init__(self):
        self.models = {}
        self.versions = {}
        self.labels = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.replacing = set()  # names between retiring a version and serving its successor

    def wait_while_replaced(self, name=None, timeout=REPLACE_WAIT_S):
        """Block while `name` (None: any model) is between versions in a
        resource-preserving transition, so its requests wait for the new
        version instead of failing; at most `timeout` seconds."""
        with self.changed:
            self.changed.wait_for(
                lambda: not (self.replacing if name is None else name in self.replacing),
                timeout)

    def lookup(self, name):
        with self.lock:
            return self.models.get(name)

    def names(self):
        with self.lock:
            return sorted(self.models)

    def resolve(self, name, version=None, label=None):
        """The served model `name` (at `version` or `label` if given), or
        ServingError NOT_FOUND."""
        with self.lock:
            loaded = self.versions.get(name) or {}
            if not loaded:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: {name!r}")
            if label:
                if label not in self.labels.get(name, {}):
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Unrecognized servable version label: {label!r}")
                version = self.labels[name][label]
            if version is None:
                return self.models[name]
            model = loaded.get(int(version))
            if model is None:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: {name!r} version {version}")
            return model

    def get(self, context, model_spec, wait=True):
        """`resolve` for a gRPC request (aborting with its status); with
        `wait`, a model between versions is waited for within the deadline."""
        version = model_spec.version.value if model_spec.HasField("version") else None
        if wait:
            self.wait_while_replaced(model_spec.name, min(
                REPLACE_WAIT_S, context.time_remaining() or REPLACE_WAIT_S))
        try:
            return self.resolve(model_spec.name, version, model_spec.version_label)
        except ServingError as error:
            context.abort(error.code, error.message)
            raise  # not reached: abort raises


class ModelManager:
    """Loads the versions each model's policy wants and follows new ones.

    A new version directory (export writes it atomically) is loaded and warmed
    while the old version keeps answering; then new requests go to it, and the
    old version finishes what it runs and is retired. A version that fails to
    load is logged and retried with backoff; it never replaces one that serves.

    Args:
        models: name -> `ModelSpec` (or a base path: the latest version).
        config_file: a `--model_config_file` to re-read every
            `config_poll_seconds` (0: never).
        allowed_root: if set, every base path must resolve inside it
            (symbolic links and `..` followed), at start and on reload.
        transition: "availability" (a new version loads while the old one
            serves: both in memory for a while) or "resource" (the old one is
            retired first: one in memory; requests wait for the new one), as
            TF Serving's version policies.
        memory_budget_bytes: with "availability", load a new version beside
            the old one only when the process's RSS plus what the old version
            took to load fits in this; otherwise make that one transition a
            resource-preserving one (None: no budget).
    """

    def __init__(self, servables, models, engine_config, poll_seconds=1.0, config_file=None,
                 config_poll_seconds=0.0, warmup=True, transition="availability",
                 allowed_root=None, memory_budget_bytes=None):
        self.allowed_root = os.path.realpath(allowed_root) if allowed_root else None
        if transition not in ("availability", "resource"):
            raise ValueError(f"transition must be availability or resource, got {transition!r}")
        self.transition = transition
        self.memory_budget_bytes = memory_budget_bytes
        self.servables = servables
        self.specs = self._checked(models)
        self.engine_config = engine_config
        self.poll_seconds = poll_seconds
        self.config_file = config_file
        self.config_poll_seconds = config_poll_seconds
        self.warmup = warmup
        self._sync_lock = threading.Lock()
        self._retry = {}  # (name, version) -> (next attempt time, backoff seconds)
        self.on_publish = None  # called with a model's name after what it serves changed
        self._stop = threading.Event()
        self._threads = []

    def _checked(self, models):
        """name -> ModelSpec, every base path inside `allowed_root` (when set)."""
        specs = {name: spec if isinstance(spec, ModelSpec) else ModelSpec(spec)
                 for name, spec in models.items()}
        if self.allowed_root:
            for name, spec in specs.items():
                path = os.path.realpath(spec.base_path)
                if os.path.commonpath([path, self.allowed_root]) != self.allowed_root:
                    raise ValueError(f"model {name}: base path {spec.base_path!r} is outside "
                                     f"the allowed root {self.allowed_root}")
        return specs

    @property
    def base_paths(self):
        return {name: spec.base_path for name, spec in self.specs.items()}

    def load_all(self):
        """Load every model's versions; raises if a model has none that loads."""
        for name in list(self.specs):
            self.sync(name, strict=True)

    def sync(self, name, strict=False):
        """Load the versions `name`'s policy wants, then retire the others."""
        with self._sync_lock:
            spec = self.specs.get(name)
            wanted = spec.wanted() if spec is not None else []
            with self.servables.lock:
                have = dict(self.servables.versions.get(name, {}))
            if spec is not None and not wanted and not have:
                raise FileNotFoundError(f"no SavedModel versions under {spec.base_path}")
            previous = max(have) if have else None
            missing = sorted(set(wanted) - set(have))
            replacing = bool(missing and have and self._retire_first(name, have))
            if replacing:
                # Free the memory first: retire what the new versions replace,
                # then load them (TF Serving's resource-preserving policy);
                # requests wait for them (`Servables.wait_while_replaced`).
                with self.servables.lock:
                    self.servables.replacing.add(name)
                for version in [v for v in have if v not in wanted]:
                    self._retire(name, have.pop(version), spec, have)
            try:
                self._load_versions(name, spec, missing, have, max(wanted) if strict else None)
                if not have and previous is not None and spec is not None:
                    # The new version failed after the old one was retired: bring it back.
                    self._load_versions(name, spec, [previous], have, None)
            finally:
                if replacing:
                    with self.servables.changed:
                        self.servables.replacing.discard(name)
                        self.servables.changed.notify_all()
            keep = {v: m for v, m in have.items() if v in wanted} or (
                {max(have): have[max(have)]} if have and spec is not None else {})
            self._publish(name, spec, keep)
            for model in [m for v, m in have.items() if v not in keep]:
                model.engine.stop()
                log_event("model_retired", model=name, version=model.version)

    def _retire_first(self, name, have):
        """Whether `name`'s old versions go before its new ones load."""
        if self.transition == "resource":
            return True
        if self.memory_budget_bytes is None:
            return False
        need = max(getattr(m, "load_bytes", 0) for m in have.values())
        rss = process_rss_bytes()
        if rss + need <= self.memory_budget_bytes:
            return False
        log_event("version_transition_resource", model=name, rss_bytes=rss,
                  new_version_bytes=need, memory_budget_bytes=self.memory_budget_bytes)
        return True

    def _load_versions(self, name, spec, versions, have, raise_for):
        """Load `versions` into `have`; a failure is logged and retried with
        backoff (re-raised for version `raise_for` when nothing loaded)."""
        for version in versions:
            retry = self._retry.get((name, version))
            if retry and time.monotonic() < retry[0]:
                continue
            try:
                have[version] = self._load(name, spec.base_path, version)
                self._retry.pop((name, version), None)
            except Exception as error:  # pylint: disable=broad-except
                backoff = min(60.0, 2 * retry[1]) if retry else 1.0
                self._retry[(name, version)] = (time.monotonic() + backoff, backoff)
                log_event("model_load_failed", model=name, version=version,
                          error=f"{type(error).__name__}: {error}", retry_in_s=backoff)
                if version == raise_for and not have:
                    raise

    def _publish(self, name, spec, loaded):
        """Make `loaded` (version -> ServedModel) what `name` answers with."""
        with self.servables.lock:
            if loaded:
                self.servables.versions[name] = dict(loaded)
                self.servables.models[name] = loaded[max(loaded)]
                self.servables.labels[name] = {
                    label: v for label, v in (spec.labels if spec else {}).items()
                    if v in loaded}
                self.servables.changed.notify_all()
            else:
                for table in (self.servables.versions, self.servables.models,
                              self.servables.labels):
                    table.pop(name, None)
        if self.on_publish is not None:
            self.on_publish(name)

    def _retire(self, name, model, spec, remaining):
        self._publish(name, spec, remaining)
        model.engine.stop()  # lets its running requests finish
        log_event("model_retired", model=name, version=model.version)

    def _load(self, name, base, version):
        start, rss = time.perf_counter(), process_rss_bytes()
        model = ServedModel(name, base, version, self.engine_config)
        if self.warmup:
            model.engine.warmup()
        else:
            model.engine.ready.set()
        model.load_bytes = max(process_rss_bytes() - rss, 0)  # what a successor will need
        log_event("model_loaded", model=name, version=version,
                  seconds=round(time.perf_counter() - start, 2),
                  kv_cache_slots=model.engine.num_slots,
                  kv_cache_bytes_per_slot=model.engine.bytes_per_slot,
                  context=model.engine.max_length)
        return model

    def reload(self, models):
        """Serve exactly `models` (name -> ModelSpec): new ones are loaded,
        removed ones retired (HandleReloadConfigRequest, a changed config file)."""
        models = self._checked(models)
        removed = set(self.specs) - set(models)
        self.specs = dict(models)
        for name in sorted(removed) + sorted(models):
            self.sync(name)
        log_event("config_reloaded", models=sorted(models))

    def start_polling(self):
        if self.poll_seconds > 0:
            self._spawn(self._poll_versions, self.poll_seconds)
        if self.config_file and self.config_poll_seconds > 0:
            self._config_text = self._read_config_text()
            self._spawn(self._poll_config, self.config_poll_seconds)

    def _spawn(self, target, seconds):
        thread = threading.Thread(target=target, args=(seconds,), name="keras-llm-versions",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll_versions(self, seconds):
        while not self._stop.wait(seconds):
            for name in list(self.specs):
                try:
                    self.sync(name)
                except Exception as error:  # pylint: disable=broad-except
                    log_event("model_load_failed", model=name, error=str(error))

    def _read_config_text(self):
        try:
            with open(self.config_file, encoding="utf-8") as handle:
                return handle.read()
        except OSError:
            return None

    def _poll_config(self, seconds):
        while not self._stop.wait(seconds):
            text = self._read_config_text()
            if text is None or text == self._config_text:
                continue
            self._config_text = text
            try:
                self.reload(read_model_config(self.config_file))
            except Exception as error:  # pylint: disable=broad-except
                log_event("config_reload_failed", file=self.config_file, error=str(error))

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


def predict_with_engine(loaded, name, inputs, on_cancel=None):
    """A generation signature's outputs, computed by the engine: the same
    tokens the SavedModel's own decode loop gives (stop ids only, greedy
    unless the request samples), padded as its outputs are.

    `on_cancel(callback)` registers what to call when the caller goes away.
    Raises ServingError."""
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
        try:
            for row, prompt in enumerate(prompts):
                p = float(top_p[row])
                params = SamplingParams(max_new_tokens=int(new[row]),
                                        temperature=max(float(temperature[row]), 0.0),
                                        top_k=max(int(top_k[row]), 0),
                                        top_p=p if 0.0 < p <= 1.0 else 1.0, seed=int(seed[row]))
                jobs.append(loaded.engine.submit(prompt, params, text=False))
        except Exception:
            for job in jobs:
                job.cancel()
            raise
    except InvalidRequest as error:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
    except QueueFull as error:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
    except EngineStopped as error:
        raise ServingError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
    if on_cancel is not None:
        on_cancel(lambda: [job.cancel() for job in jobs])
    for job in jobs:
        job.done.wait()
    if any(job.result.finish_reason == "error" for job in jobs):
        raise ServingError(grpc.StatusCode.INTERNAL, "generation failed")
    if any(job.result.finish_reason == "cancelled" for job in jobs):
        raise ServingError(grpc.StatusCode.CANCELLED, "the request was cancelled")
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


MAX_TENSOR_ELEMENTS = 1 << 22  # a Predict input larger than this is refused
MAX_MESSAGE_BYTES = 8 << 20  # gRPC requests (HTTP bodies too): RESOURCE_EXHAUSTED past it


def tensor_from_proto(key, proto, dtype):
    """A request's `TensorProto` as numpy, checked before anything is
    allocated: dtype, dims >= 0, at most MAX_TENSOR_ELEMENTS, content size."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if proto.dtype != dtype.as_datatype_enum:
        raise ServingError(bad, f"input {key}: expects {dtype.name}, got "
                                f"{tensors.dtype_name(proto.dtype)}")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise ServingError(bad, f"input {key}: negative dimension in shape {dims}")
    count = int(np.prod(dims, dtype=np.float64)) if dims else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise ServingError(bad, f"input {key}: {count} elements is over the limit of "
                                f"{MAX_TENSOR_ELEMENTS}")
    if proto.tensor_content:
        if dtype.name == "string":
            raise ServingError(bad, f"input {key}: string tensors cannot use tensor_content")
        if len(proto.tensor_content) != count * dtype.size:
            raise ServingError(bad, f"input {key}: tensor_content has "
                                    f"{len(proto.tensor_content)} bytes, shape {dims} of "
                                    f"{dtype.name} needs {count * dtype.size}")
    else:
        values = len(getattr(proto, dtype.field))
        if values > count:  # fewer repeat the last one, as TensorFlow reads them
            raise ServingError(bad, f"input {key}: {values} values for shape {dims}")
    try:
        return tensors.make_ndarray(proto)
    except (TypeError, ValueError) as error:
        raise ServingError(bad, f"input {key}: {error}") from None


def check_inputs(model, name, inputs):
    """The signature `name` of `model` and its inputs checked against the
    SavedModel's signature def; raises ServingError."""
    if name not in model.input_specs:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Serving signature key \"{name}\" not found.")
    spec = model.input_specs[name]
    if set(inputs) != set(spec):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"signature {name} expects inputs {sorted(spec)}, got "
                           f"{sorted(inputs)}")
    return spec


def predict(model, name, inputs, output_filter=(), on_cancel=None):
    """TF Serving Predict on `model` (gRPC and REST): `inputs` are numpy
    arrays of the signature's dtypes. Returns the outputs wanted; raises
    ServingError."""
    spec = check_inputs(model, name, inputs)
    most = model.engine.config.max_batch_size
    for key, value in inputs.items():
        if value.ndim and value.shape[0] > most:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {key}: a batch of {value.shape[0]} rows is over the "
                               f"limit of {most} (--max_batch_size)")
    ids = inputs.get("token_ids")
    if ids is not None and ids.ndim == 2 and ids.shape[1] > model.engine.context_length:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input token_ids: {ids.shape[1]} positions exceed the model's "
                           f"context of {model.engine.context_length}")
    for key, value in inputs.items():
        if not spec[key].shape.is_compatible_with(value.shape):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {key}: shape {list(value.shape)} does not match "
                               f"{spec[key].shape}")
    known = set(model.signature_defs[name].outputs)
    wanted = set(output_filter) or known
    unknown = wanted - known
    if unknown:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"output_filter names unknown outputs {sorted(unknown)}")
    if name in ENGINE_SIGNATURES:
        outputs = predict_with_engine(model.engine, name, inputs, on_cancel)
    else:
        function = model.engine.signatures[name]  # loads the SavedModel on first use
        import tensorflow as tf  # pylint: disable=import-outside-toplevel  (loaded by now)
        try:
            outputs = {k: v.numpy() for k, v in function(
                **{k: tf.constant(v) for k, v in inputs.items()}).items()}
        except tf.errors.InvalidArgumentError as error:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               error.message.splitlines()[0]) from None
    return {key: outputs[key] for key in sorted(wanted)}


def result_summary(result):
    """A `Result` as the fields of the Generate stream's `Summary`."""
    return {"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "generated_tokens": len(result.token_ids), "queue_s": result.queue_s,
            "time_to_first_token_s": result.time_to_first_token_s, "total_s": result.total_s,
            "text": result.text, "token_ids": list(result.token_ids)}


def record_request(metrics, name, summary, gaps, api):
    """A finished generation request: its metrics and one JSON log line."""
    if metrics is not None:
        metrics.observe(name, summary, gaps)
    log_event("request", model=name, api=api, finish_reason=summary["finish_reason"],
              prompt_tokens=summary["prompt_tokens"],
              generated_tokens=summary["generated_tokens"],
              queue_s=round(summary["queue_s"], 4),
              ttft_s=round(summary["time_to_first_token_s"], 4),
              total_s=round(summary["total_s"], 4))


class PredictionService:
    def __init__(self, servables):
        self.servables = servables

    def Predict(self, request, context):
        model = self.servables.get(context, request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        inputs = {}
        try:
            spec = check_inputs(model, name, request.inputs)
            for key, proto in request.inputs.items():
                inputs[key] = tensor_from_proto(key, proto, spec[key].dtype)
            outputs = predict(model, name, inputs, request.output_filter, context.add_callback)
        except ServingError as error:
            context.abort(error.code, error.message)
        response = tf_serving.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tensors.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        model = self.servables.get(context, request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "metadata_field must be exactly ['signature_def']")
        signature_map = tf_serving.SignatureDefMap()
        for key, value in model.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response = tf_serving.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def _unimplemented(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "keras-llm serves generation models: use Predict or the Generation service")

    Classify = Regress = MultiInference = _unimplemented


class ModelService:
    def __init__(self, servables, manager):
        self.servables = servables
        self.manager = manager

    def GetModelStatus(self, request, context):
        spec = request.model_spec
        if spec.HasField("version") or spec.version_label:
            models = [self.servables.get(context, spec, wait=False)]
        else:
            with self.servables.lock:
                models = sorted((self.servables.versions.get(spec.name) or {}).values(),
                                key=lambda m: m.version)
            if not models:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"Servable not found for request: {spec.name!r}")
        response = tf_serving.GetModelStatusResponse()
        for model in models:
            status = response.model_version_status.add()
            status.version = model.version
            status.state = tf_serving.VERSION_STATES[
                "AVAILABLE" if model.engine.ready.is_set() else "LOADING"]
        return response

    def HandleReloadConfigRequest(self, request, context):
        response = tf_serving.ReloadConfigResponse()
        if request.config.WhichOneof("config") != "model_config_list":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "only a model_config_list config is supported")
        try:
            models = model_specs(request.config)
            self.manager.reload(models)
        except (ValueError, OSError) as error:
            response.status.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            response.status.error_message = str(error)
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
        running = prom.Gauge("keras_llm_requests_running",
                             "Requests in a sequence slot or being prefilled into one", **kw)
        prefilling = prom.Gauge("keras_llm_requests_prefilling",
                                "Requests being prefilled into a slot", **kw)
        waiting = prom.Gauge("keras_llm_requests_waiting", "Requests waiting for a slot", **kw)
        self._gauges = {"running": running, "prefilling": prefilling, "waiting": waiting}
        self._servables = servables

    def track(self, name):
        """Make the request gauges follow the current version of `name`."""
        def stat(key):
            model = self._servables.lookup(name)
            return model.engine.stats()[key] if model else 0

        for key, gauge in self._gauges.items():
            gauge.labels(name).set_function(lambda key=key: stat(key))

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
            self.servables.wait_while_replaced(request.model_name or None)
            with self.servables.lock:
                models = dict(self.servables.models)
            name = request.model_name or (next(iter(models)) if len(models) == 1 else "")
            if name not in models:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {name!r}")
            engine = models[name].engine
            which = request.WhichOneof("prompt")
            if request.messages and (which is not None or request.system):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "give messages without text, ids or system (a system message "
                              "goes first in messages)")
            try:
                if request.messages:
                    prompt_ids = engine.encode(messages=[
                        {"role": m.role, "content": m.content} for m in request.messages])
                elif which == "ids":
                    prompt_ids = list(request.ids.ids)
                elif which == "text":
                    prompt_ids = engine.encode(request.text, chat=request.chat,
                                               system=request.system)
                else:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  "give a prompt as text, ids or messages")
            except ValueError as error:  # bad messages, or the chat template refused them
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
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
                record_request(self.metrics, name, summary, gaps, "grpc")
                yield generation_pb2.GenerateResponse(summary=generation_pb2.Summary(**summary))
                return


HEALTH_SERVICES = ("", "tensorflow.serving.PredictionService",
                   "tensorflow.serving.ModelService", "keras_llm.serving.Generation")


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Every method but health needs `authorization: Bearer KEY` metadata."""

    def __init__(self, key):
        self._expected = f"Bearer {key}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler

        def refuse(request, context):
            del request
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong API key (send metadata 'authorization: Bearer KEY')")

        kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream
                else "stream_unary" if handler.stream_unary else "stream_stream")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _parse_in_handler(handler):
    """`handler` with its request parsed inside the method, so a request that
    is not a valid message (bad wire format, invalid UTF-8 in a string) is
    INVALID_ARGUMENT; gRPC answers INTERNAL when its own deserializer fails."""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler

    def decode(raw, context):
        try:
            return parse(raw)
        except Exception:  # pylint: disable=broad-except  (DecodeError and kin)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "the request is not a valid protobuf message for this method")
            raise  # not reached: abort raises

    kind = "unary_unary" if handler.unary_unary else "unary_stream"
    method = getattr(handler, kind)
    return getattr(grpc, f"{kind}_rpc_method_handler")(
        lambda raw, context: method(decode(raw, context), context),
        response_serializer=handler.response_serializer)


class _ParsedInHandler(grpc.GenericRpcHandler):
    def __init__(self, inner):
        self._inner = inner

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        return None if handler is None else _parse_in_handler(handler)


class _Registrar:
    """What a generated `add_*Servicer_to_server` registers with, passing
    every method on to the server through `_parse_in_handler`."""

    def __init__(self, server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers):
        self._server.add_generic_rpc_handlers(tuple(_ParsedInHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service, handlers):
        self._server.add_registered_method_handlers(
            service, {name: _parse_in_handler(h) for name, h in handlers.items()})


def tf_serving_handler(service, servicer):
    """A gRPC handler of one of TF Serving's services (`tf_serving.SERVICES`)
    over `servicer`'s methods of the same names; methods without messages
    (Classify, Regress, MultiInference) take the raw request."""
    handlers = {}
    for method, (request, response) in tf_serving.SERVICES[service].items():
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method),
            request_deserializer=request.FromString if request else None,
            response_serializer=response.SerializeToString if response else None)
    return grpc.method_handlers_generic_handler(service, handlers)


def read_text_proto(path, message):
    """`message` filled from the text proto file `path`; ValueError naming the
    file when it does not parse (TF Serving's config files are text protos)."""
    from google.protobuf import text_format  # pylint: disable=import-outside-toplevel

    with open(path, encoding="utf-8") as handle:
        try:
            return text_format.Parse(handle.read(), message)
        except text_format.ParseError as error:
            raise ValueError(f"{path}: {error}") from None


def read_ssl_config(path):
    """TF Serving's `--ssl_config_file` (text `SSLConfig`)."""
    from keras_llm.serving.protos import config_pb2  # pylint: disable=import-outside-toplevel
    config = read_text_proto(path, config_pb2.SSLConfig())
    if not config.server_key or not config.server_cert:
        raise ValueError(f"{path}: server_key and server_cert are required")
    if config.client_verify and not config.custom_ca:
        raise ValueError(f"{path}: client_verify needs custom_ca")
    return config


def read_monitoring_config(path):
    """The Prometheus path of TF Serving's `--monitoring_config_file`, or None."""
    from keras_llm.serving.protos import config_pb2  # pylint: disable=import-outside-toplevel
    prometheus = read_text_proto(path, config_pb2.MonitoringConfig()).prometheus_config
    if not prometheus.enable:
        return None
    return prometheus.path or "/monitoring/prometheus/metrics"


class Server:
    """A running keras-llm server.

    Args:
        models: dict name -> base path (the directory holding version dirs)
            or `ModelSpec`.
        port: gRPC port (0 picks a free one); `self.port` is the bound one.
        host: address to bind; loopback unless told otherwise.
        engine_config: `EngineConfig` for every model.
        metrics_port: serve Prometheus metrics over HTTP on this port (None: off).
        poll_seconds: how often to look for new versions (0: never).
        profiler_port: start TensorFlow's profiler server on this port.
        rest_api_port: HTTP port (OpenAI API, TF Serving REST; None: off,
            0: pick one); `self.rest_api_port` is the bound one.
        api_key: required on every gRPC method and HTTP route but health.
        ssl_config: an `SSLConfig` (`read_ssl_config`): TLS on both ports.
        enable_reflection: gRPC server reflection (off by default).
        monitoring_path: HTTP path of Prometheus metrics (besides /metrics).
        config_file, config_poll_seconds: re-read a model config file.
        grpc_options: extra gRPC server channel arguments.
        grpc_socket_path: also listen on this UNIX socket.
        cors: allow cross-origin HTTP requests.
        warmup: run each step size before a version serves.
        grace_seconds: how long `drain` lets running requests finish.
        rest_timeout_s: deadline of a non-streaming HTTP request.
        version_transition: "availability" or "resource" (`ModelManager`).
        allowed_model_root: every model's base path must be inside it.
        memory_budget_bytes: RSS a reload may reach (`ModelManager`).
    """

    def __init__(self, models, port=8500, host="127.0.0.1", engine_config=None,
                 metrics_port=None, poll_seconds=1.0, profiler_port=None, max_workers=None,
                 rest_api_port=None, api_key=None, ssl_config=None, enable_reflection=False,
                 monitoring_path=None, config_file=None, config_poll_seconds=0.0,
                 grpc_options=(), grpc_socket_path=None, cors=False, warmup=True,
                 grace_seconds=30.0, rest_timeout_s=None, version_transition="availability",
                 allowed_model_root=None, memory_budget_bytes=None):
        self.servables = Servables()
        self.manager = ModelManager(self.servables, models, engine_config or EngineConfig(),
                                    poll_seconds, config_file, config_poll_seconds, warmup,
                                    version_transition, allowed_model_root,
                                    memory_budget_bytes)
        self.metrics = Metrics(self.servables)
        self.serving = False
        self.loading = True
        interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
        config = self.manager.engine_config
        # Every stream holds a worker thread: enough for each model's slots and
        # queue plus room for health, status and the requests the engine
        # refuses (RESOURCE_EXHAUSTED at once), so health never waits behind
        # generation; past that gRPC itself answers RESOURCE_EXHAUSTED.
        max_workers = max_workers or max(
            64, len(self.manager.specs) * (config.max_slots + config.max_queue) + 32)
        options = [("grpc.max_send_message_length", 64 << 20),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.so_reuseport", 0), *grpc_options]
        self.grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
                                options=options, interceptors=interceptors,
                                maximum_concurrent_rpcs=max_workers)
        registrar = _Registrar(self.grpc)
        for service, servicer in (
                ("tensorflow.serving.PredictionService", PredictionService(self.servables)),
                ("tensorflow.serving.ModelService", ModelService(self.servables, self.manager))):
            registrar.add_generic_rpc_handlers((tf_serving_handler(service, servicer),))
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationService(self.servables, self.metrics), registrar)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if enable_reflection:
            from grpc_reflection.v1alpha import reflection  # pylint: disable=import-outside-toplevel
            reflection.enable_server_reflection(
                [*HEALTH_SERVICES[1:], health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if ssl_config is not None:
            credentials = grpc.ssl_server_credentials(
                [(ssl_config.server_key.encode(), ssl_config.server_cert.encode())],
                root_certificates=ssl_config.custom_ca.encode() or None,
                require_client_auth=bool(ssl_config.client_verify))
            self.port = self.grpc.add_secure_port(f"{host}:{port}", credentials)
        else:
            self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot bind gRPC to {host}:{port} (in use?)")
        if grpc_socket_path:
            self.grpc.add_insecure_port(f"unix:{grpc_socket_path}")
        self.host = host
        self.metrics_port = None
        if metrics_port is not None:
            import prometheus_client as prom  # pylint: disable=import-outside-toplevel

            self._metrics_server, _ = prom.start_http_server(metrics_port, addr=host,
                                                             registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        if profiler_port:
            import tensorflow as tf  # pylint: disable=import-outside-toplevel
            tf.profiler.experimental.server.start(profiler_port)
        self.http = None
        self.rest_api_port = None
        self._tls_dir = None
        if rest_api_port is not None:
            from keras_llm.serving.http import Frontend, HTTPServer  # pylint: disable=import-outside-toplevel
            app = Frontend(self, api_key=api_key, monitoring_path=monitoring_path,
                           timeout_s=rest_timeout_s)
            if cors:
                from starlette.middleware.cors import CORSMiddleware  # pylint: disable=import-outside-toplevel
                app = CORSMiddleware(app, allow_origins=["*"], allow_methods=["*"],
                                     allow_headers=["*"])
            self.http = HTTPServer(app, host, rest_api_port, ssl=self._http_tls(ssl_config),
                                   grace_seconds=grace_seconds)
            self.rest_api_port = self.http.port
        self.grpc.start()
        try:
            self.manager.load_all()
        except Exception:
            self.grpc.stop(0)
            if self.http is not None:
                self.http.stop(5)
            raise
        self.loading = False
        self._draining = False
        self._tracked = set()
        self.manager.on_publish = self._published
        for name in self.manager.specs:
            self._published(name)
        self.manager.start_polling()
        log_event("serving", models=sorted(self.manager.specs), host=host, port=self.port,
                  rest_api_port=self.rest_api_port, metrics_port=self.metrics_port,
                  tls=ssl_config is not None, api_key=bool(api_key))

    def _published(self, name):
        """What `name` serves changed: its gauges follow it, and health says
        SERVING while any model is served (a server started on a model config
        file it could not read yet serves none)."""
        if name not in self._tracked and self.servables.lookup(name) is not None:
            self._tracked.add(name)
            self.metrics.track(name)
        if self._draining:
            return
        with self.servables.lock:  # a model between versions still counts
            up = bool(self.servables.models or self.servables.replacing)
        status = (health_pb2.HealthCheckResponse.SERVING if up
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in HEALTH_SERVICES:
            self.health.set(service, status)
        self.serving = up

    def _http_tls(self, ssl_config):
        """uvicorn's TLS options: the PEM texts written to private files."""
        if ssl_config is None:
            return None
        import ssl  # pylint: disable=import-outside-toplevel
        import tempfile  # pylint: disable=import-outside-toplevel
        self._tls_dir = tempfile.TemporaryDirectory(prefix="keras-llm-tls-")
        paths = {}
        for key in ("server_key", "server_cert", "custom_ca"):
            text = getattr(ssl_config, key)
            if text:
                paths[key] = os.path.join(self._tls_dir.name, f"{key}.pem")
                with open(os.open(paths[key], os.O_WRONLY | os.O_CREAT, 0o600), "w",
                          encoding="utf-8") as handle:
                    handle.write(text)
        options = {"ssl_keyfile": paths["server_key"], "ssl_certfile": paths["server_cert"]}
        if "custom_ca" in paths:
            options["ssl_ca_certs"] = paths["custom_ca"]
        if ssl_config.client_verify:
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options

    def drain(self, grace_seconds=30.0):
        """SIGTERM: stop taking work, finish running requests, then stop."""
        self._draining = True
        self.serving = False
        self.health.enter_graceful_shutdown()
        self.manager.stop()
        with self.servables.lock:
            models = [m for versions in self.servables.versions.values()
                      for m in versions.values()]
        for model in models:
            model.engine.stop(timeout=grace_seconds)
        self.grpc.stop(grace_seconds).wait()
        if self.http is not None:
            self.http.stop(grace_seconds)
        if self.metrics_port is not None:
            self._metrics_server.shutdown()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
        log_event("stopped")


def model_specs(config):
    """name -> `ModelSpec` of a `ModelServerConfig` proto."""
    models = {}
    for c in config.model_config_list.config:
        if not c.name or not c.base_path:
            raise ValueError("every model config needs a name and a base_path")
        if c.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model {c.name}: model_platform {c.model_platform!r} is not "
                             "supported (keras-llm serves tensorflow SavedModels)")
        policy = c.model_version_policy.WhichOneof("policy_choice") or "latest"
        spec = ModelSpec(c.base_path, policy, labels=dict(c.version_labels))
        if policy == "latest":
            spec.num_versions = c.model_version_policy.latest.num_versions or 1
        elif policy == "specific":
            spec.versions = tuple(c.model_version_policy.specific.versions)
            if not spec.versions:
                raise ValueError(f"model {c.name}: a specific version policy needs versions")
        models[c.name] = spec
    if not models:
        raise ValueError("the model config lists no models")
    return models


# How often an unreadable --model_config_file is tried again when no poll
# interval was given.
CONFIG_RETRY_SECONDS = 2.0


def read_model_config(path):
    """name -> `ModelSpec` of a TF Serving `--model_config_file` (text
    ModelServerConfig: names, base paths, `model_version_policy`,
    `version_labels`)."""
    return model_specs(read_text_proto(path, tf_serving.ModelServerConfig()))


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


def _flag_bool(value):
    """TF Serving's boolean flags: `--flag`, `--flag=true|false|1|0`."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# tensorflow_model_server flags that have no meaning here: accepted, with a
# one-line warning, so a TF Serving command line starts keras-llm unchanged.
IGNORED_FLAGS = {
    "rest_api_num_threads": "HTTP runs on an event loop",
    "per_process_gpu_memory_fraction": "the engine sizes its own memory (--kv_cache_bytes)",
    "num_load_threads": "versions load one at a time",
    "num_unload_threads": "versions unload one at a time",
    "max_num_load_retries": "failed loads are retried with backoff until they succeed",
    "load_retry_interval_micros": "failed loads are retried with backoff (1 s to 60 s)",
    "flush_filesystem_caches": None,
    "tensorflow_session_config_file": "no TensorFlow session serves generation",
    "platform_config_file": "keras-llm serves tensorflow SavedModels only",
    "saved_model_tags": "the serve tag is always used",
    "num_request_iterations_for_warmup": None,
    "remove_unused_fields_from_bundle_metagraph": None,
    "prefer_tflite_model": "the export's LiteRT files are used when present (--engine_backend)",
    "use_tflite_model": "the export's LiteRT files are used when present (--engine_backend)",
    "tflite_interpreter_pool_size": "one interpreter decodes every slot",
    "enable_signature_method_name_check": None,
    "xla_cpu_compilation_enabled": "XLA is used by the saved_model backend",
    "enable_profiler": "use --profiler_port",
    "mixed_precision": "precision is chosen at export",
    "skip_initialize_tpu": None,
    "thread_pool_factory_config_file": None,
    "enable_per_model_batching_parameters": "one batching parameters file for every model",
    "allow_version_labels_for_unavailable_models": None,
    "enable_grpc_healthcheck_service": "grpc.health.v1 is always on",
    "use_alts_credentials": "use --ssl_config_file",
    "model_warmup_options": None,
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-llm serve",
        description="Serve keras-llm exports over gRPC (TF Serving's API plus streaming "
                    "generation) and HTTP (--rest_api_port: the OpenAI API and TF Serving's "
                    "REST API). tensorflow_model_server's flags are accepted.")
    add = parser.add_argument
    flag = dict(type=_flag_bool, nargs="?", const=True)
    add("--port", type=int, default=8500, help="gRPC port")
    add("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    add("--grpc_socket_path", default="", help="also serve gRPC on this UNIX socket")
    add("--rest_api_port", type=int, default=0,
        help="HTTP port for the OpenAI API and TF Serving's REST API (0: off)")
    add("--rest_api_timeout_in_ms", type=int, default=0,
        help="deadline of a non-streaming HTTP request (0: none)")
    add("--rest_api_enable_cors_support", default=False, **flag)
    add("--model_name", default=None)
    add("--model_base_path")
    add("--model_config_file", help="TF Serving model config (several models, versions, labels)")
    add("--model_config_file_poll_wait_seconds", type=float, default=0.0,
        help="re-read --model_config_file this often (0: never)")
    add("--file_system_poll_wait_seconds", type=float, default=1.0)
    add("--enable_batching", default=None, **flag)
    add("--batching_parameters_file")
    add("--monitoring_config_file", help="Prometheus on the HTTP port (prometheus_config)")
    add("--ssl_config_file", help="TLS on gRPC and HTTP (server_key, server_cert, custom_ca, "
                                  "client_verify)")
    add("--api_key", default=None, help="require 'Authorization: Bearer KEY' (or @FILE)")
    add("--enable_reflection", default=False, **flag)
    add("--grpc_max_threads", type=int, default=0,
        help="gRPC worker threads (0: every model's slots + queue + 32, at least 64)")
    add("--grpc_channel_arguments", default="", help="k=v,k=v gRPC server arguments")
    add("--tensorflow_session_parallelism", type=int, default=0)
    add("--tensorflow_intra_op_parallelism", type=int, default=0)
    add("--tensorflow_inter_op_parallelism", type=int, default=0)
    add("--tflite_num_threads", type=int, default=0)
    add("--enable_model_warmup", default=True, **flag)
    add("--version", action="store_true", help="print the version and exit")
    add("--allowed_model_root", default=None,
        help="refuse model base paths outside this directory (at start and on reload)")
    add("--version_transition", choices=("availability", "resource"), default="availability",
        help="load a new version beside the serving one (availability) or retire the old one "
             "first (resource: one version in memory; requests wait for the new one)")
    add("--reload_memory_budget_mb", type=float, default=0,
        help="with availability: load a new version beside the old one only when the server's "
             "RSS plus what the old one took to load fits in this many MiB, else retire the "
             "old one first (0: no budget)")
    add("--max_batch_size", type=int, default=64,
        help="most rows in one Predict request (not TF Serving's batching parameter)")
    add("--max_slots", type=int, default=None)
    add("--max_queue", type=int, default=None)
    add("--max_length", type=int, default=1024,
        help="tokens per sequence slot (prompt bucket + new tokens)")
    add("--engine_backend", choices=("auto", "litert", "saved_model"), default="auto",
        help="decode with the export's LiteRT file when it has one (auto), always (litert) or "
             "with its XLA functions (saved_model)")
    add("--num_threads", type=int, default=0, help="LiteRT threads (0: every core)")
    add("--kv_cache_bytes", type=int, default=0,
        help="memory budget of the KV cache per model (0: max_slots slots)")
    add("--draft", default=None,
        help="speculative decoding: a draft model's LiteRT files (an export version directory, "
             "e.g. the same model exported with --litert int4, or a .tflite keras-llm wrote); "
             "a request decoding alone gets the same tokens sooner")
    add("--speculative_tokens", type=int, default=SPECULATIVE_TOKENS,
        help="draft tokens checked per step (1-7)")
    add("--metrics_port", type=int, default=None)
    add("--profiler_port", type=int, default=None)
    add("--grace_period_s", type=float, default=30.0)
    for name in IGNORED_FLAGS:
        add(f"--{name}", default=None, nargs="?", const="true", help=argparse.SUPPRESS)
    return parser


def _channel_arguments(text):
    options = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--grpc_channel_arguments: {item!r} is not key=value")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return options


# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def limit_malloc_arenas(count=2):
    """Let the process's threads share `count` malloc arenas (glibc gives
    each new thread one of its own, up to eight per core, each keeping the
    pages it freed): the int8 SmolLM2 server's peak
    at 16 streams was 474 MB with glibc's default and 469 with two. Where
    `MALLOC_ARENA_MAX` is set, glibc has read it and it stands. Returns
    whether the limit was set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, int(count)))
    except (OSError, AttributeError):  # not glibc
        return False


def main(argv=None):
    limit_malloc_arenas()  # before any thread is started
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version  # pylint: disable=import-outside-toplevel
        print(f"keras-llm serve {version('keras-llm')} (TensorFlow {version('tensorflow')})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, why in IGNORED_FLAGS.items():
        if getattr(args, name) is not None:
            LOG.warning("--%s has no effect in keras-llm serve%s", name, f": {why}" if why else "")
    if args.enable_batching is not None and args.enable_batching is False:
        LOG.warning("--enable_batching=false: keras-llm always batches concurrent requests")
    config_poll = args.model_config_file_poll_wait_seconds
    if args.model_config_file:
        try:
            models = read_model_config(args.model_config_file)
        except (OSError, ValueError) as error:
            # As TF Serving: stay up, say why, and serve the file once it reads.
            config_poll = config_poll or CONFIG_RETRY_SECONDS
            LOG.warning("--model_config_file %s: %s; serving no models until it reads "
                        "(re-read every %g s)", args.model_config_file,
                        getattr(error, "strerror", None) or error, config_poll)
            models = {}
    elif args.model_base_path:
        models = {args.model_name or "default": args.model_base_path}
    else:
        parser.error("give --model_base_path (and --model_name), or --model_config_file")
    threads = (args.tflite_num_threads or args.tensorflow_intra_op_parallelism
               or args.tensorflow_session_parallelism or args.num_threads)
    intra = args.tensorflow_intra_op_parallelism or args.tensorflow_session_parallelism
    inter = args.tensorflow_inter_op_parallelism or args.tensorflow_session_parallelism
    if intra or inter:  # TensorFlow's own pools: asked for, so TensorFlow is loaded
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    config = EngineConfig(max_length=args.max_length, memory_budget_bytes=args.kv_cache_bytes,
                          backend=args.engine_backend, num_threads=threads,
                          max_batch_size=args.max_batch_size, draft=args.draft or "",
                          speculative_tokens=args.speculative_tokens)
    if args.batching_parameters_file:
        read_batching_parameters(args.batching_parameters_file, config)
    if args.max_slots:
        config.max_slots = args.max_slots
    if args.max_queue:
        config.max_queue = args.max_queue
    api_key = args.api_key or os.environ.get("KERAS_LLM_API_KEY") or None
    if api_key and api_key.startswith("@"):
        with open(api_key[1:], encoding="utf-8") as handle:
            api_key = handle.read().strip()
    server = Server(
        models, args.port, args.host, config, metrics_port=args.metrics_port,
        poll_seconds=args.file_system_poll_wait_seconds, profiler_port=args.profiler_port,
        max_workers=args.grpc_max_threads or None, rest_api_port=args.rest_api_port or None,
        api_key=api_key,
        ssl_config=read_ssl_config(args.ssl_config_file) if args.ssl_config_file else None,
        enable_reflection=args.enable_reflection,
        monitoring_path=(read_monitoring_config(args.monitoring_config_file)
                         if args.monitoring_config_file else None),
        config_file=args.model_config_file,
        config_poll_seconds=config_poll,
        grpc_options=_channel_arguments(args.grpc_channel_arguments),
        grpc_socket_path=args.grpc_socket_path or None,
        cors=args.rest_api_enable_cors_support, warmup=args.enable_model_warmup,
        grace_seconds=args.grace_period_s,
        rest_timeout_s=args.rest_api_timeout_in_ms / 1000 if args.rest_api_timeout_in_ms else None,
        version_transition=args.version_transition,
        memory_budget_bytes=int(args.reload_memory_budget_mb * 2**20) or None,
        allowed_model_root=args.allowed_model_root)
    where = f"{args.host}:{server.port}"
    if server.rest_api_port:
        where += f" (HTTP {server.rest_api_port})"
    print(f"keras-llm serving {', '.join(sorted(models)) or 'no models yet'} on {where}",
          flush=True)
    done = threading.Event()

    def on_signal(*_):
        threading.Thread(target=lambda: (server.drain(args.grace_period_s), done.set()),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    return 0
