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
import logging
import os
import signal
import threading

import grpc
import tensorflow as tf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving.engine import Engine, EngineConfig, InvalidRequest, QueueFull, Sampling
from serving.protos import generation_pb2, generation_pb2_grpc

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
        self.engine = Engine(self.path, engine_config)
        self.signatures = self.engine.module.signatures
        from tensorflow.python.saved_model import loader_impl  # pylint: disable=import-outside-toplevel
        self.signature_defs = loader_impl.parse_saved_model(self.path).meta_graphs[0].signature_def


class Servables:
    """The models the server answers for, by name."""

    def __init__(self):
        self.models = {}

    def get(self, context, model_spec):
        name = model_spec.name
        model = self.models.get(name)
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


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servables):
        self.servables = servables

    def Predict(self, request, context):
        model = self.servables.get(context, request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        if name not in model.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Serving signature key \"{name}\" not found.")
        function = model.signatures[name]
        spec = function.structured_input_signature[1]
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
            inputs[key] = tf.constant(value)
        try:
            outputs = function(**inputs)
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
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
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


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, servables):
        self.servables = servables

    def Generate(self, request, context):
        models = self.servables.models
        name = request.model_name or (next(iter(models)) if len(models) == 1 else "")
        if name not in models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {name!r}")
        engine = models[name].engine
        which = request.WhichOneof("prompt")
        if which == "ids":
            prompt_ids = list(request.ids.ids)
        elif which == "text":
            prompt_ids = engine.encode(request.text, chat=request.chat, system=request.system)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a prompt as text or ids")
        o = request.sampling
        sampling = Sampling(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                            top_k=o.top_k, top_p=o.top_p or 1.0, seed=o.seed,
                            stop=tuple(o.stop), stop_ids=tuple(o.stop_ids))
        try:
            job = engine.submit(prompt_ids, sampling)
        except InvalidRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except QueueFull as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        context.add_callback(job.cancel)  # client gone or deadline passed
        while True:
            event = job.events.get()
            if event[0] == "delta":
                yield generation_pb2.GenerateResponse(
                    delta=generation_pb2.Delta(text=event[1], token_ids=event[2]))
            else:
                yield generation_pb2.GenerateResponse(
                    summary=generation_pb2.Summary(**event[1]))
                return


def build_server(name, base_path, port=8500, host="127.0.0.1", engine_config=None,
                 max_workers=64):
    """Load the latest version, warm it up and return a started gRPC server.

    Returns:
        `(server, servables, health_servicer, bound_port)`.
    """
    servables = Servables()
    version = latest_version(base_path)
    model = ServedModel(name, base_path, version, engine_config or EngineConfig())
    servables.models[name] = model
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.max_send_message_length", 64 << 20),
                                  ("grpc.max_receive_message_length", 64 << 20)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(servables), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(servables), server)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationService(servables), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", "tensorflow.serving.PredictionService",
                    "keras_llm.serving.Generation"):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    model.engine.warmup()
    for service in ("", "tensorflow.serving.PredictionService",
                    "keras_llm.serving.Generation"):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    LOG.info("serving %s version %d on %s:%d", name, version, host, bound)
    return server, servables, health_servicer, bound


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-llm serve")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--model_base_path", required=True)
    parser.add_argument("--max_slots", type=int, default=16)
    parser.add_argument("--max_queue", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--kv_cache_bytes", type=int, default=0)
    parser.add_argument("--grace_period_s", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = EngineConfig(max_slots=args.max_slots, max_queue=args.max_queue,
                          max_length=args.max_length, memory_budget_bytes=args.kv_cache_bytes)
    server, servables, health_servicer, port = build_server(
        args.model_name, args.model_base_path, args.port, args.host, config)
    print(f"keras-llm serving {args.model_name} on {args.host}:{port}", flush=True)
    done = threading.Event()

    def on_term(*_):
        health_servicer.enter_graceful_shutdown()
        for model in servables.models.values():
            model.engine.stop(timeout=args.grace_period_s)
        server.stop(args.grace_period_s).wait()
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    done.wait()
    return 0

