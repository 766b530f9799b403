"""A small client for keras-llm servers (and TF Serving for `predict`).

    from keras_llm.serving.client import Client
    with Client("127.0.0.1:8500") as client:
        for delta in client.stream("Hello!", chat=True):
            print(delta, end="")
        client.generate(messages=[{"role": "user", "content": "Hi!"},
                                  {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "Who are you?"}]).text
        client.predict("smollm2", ["The capital of France is"])["text"]

Every call carries a deadline (`timeout`, seconds). With several replicas
(`Client("10.0.0.1:8500,10.0.0.2:8500")`, or a DNS name that resolves to all
of them, `Client("dns:///keras-llm.default.svc.cluster.local:8500")`) requests
are spread over them per call, and a call that a replica dropped is retried
on another.
"""

import ipaddress
import json
import socket
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc

# Calls that are safe to send twice: answering them changes nothing on the
# server (a Generate with the same request gives the same tokens, unless it
# samples without a seed; a stream that already delivered tokens is then
# not re-issued, see `Client.stream_responses`).
RETRIED_METHODS = (
    ("keras_llm.serving.Generation", "Generate"),
    ("tensorflow.serving.PredictionService", "Predict"),
    ("tensorflow.serving.PredictionService", "GetModelMetadata"),
    ("tensorflow.serving.ModelService", "GetModelStatus"),
    ("grpc.health.v1.Health", "Check"),
)


# Target schemes of gRPC's name resolvers: such a target is passed on as it is.
GRPC_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")


def service_config(max_attempts=5):
    """gRPC service config: round robin over every address of the target, and
    UNAVAILABLE retried (before any response arrived) for `RETRIED_METHODS`."""
    config = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts >= 2:
        config["methodConfig"] = [{
            "name": [{"service": s, "method": m} for s, m in RETRIED_METHODS],
            "retryPolicy": {"maxAttempts": min(max_attempts, 5),  # gRPC's most
                            "initialBackoff": "0.1s", "maxBackoff": "2s",
                            "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return json.dumps(config)


def _split_host_port(address):
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def _resolve(address):
    """`host:port` -> (ipv4 `a.b.c.d:port` or None, ipv6 `[::1]:port` or None)."""
    host, port = _split_host_port(address)
    try:
        ip = ipaddress.ip_address(host)
        found = {ip.version: ip}
    except ValueError:
        found = {}
        for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            found.setdefault(ip.version, ip)
    v4 = f"{found[4]}:{port}" if 4 in found else None
    v6 = f"[{found[6]}]:{port}" if 6 in found else None
    return v4, v6


def channel_target(target):
    """The gRPC target of one target or several.

    One (`host:port`, or a target with a scheme: `dns:///host:port`,
    `ipv4:a:p,b:p`, `unix:path`) is used as it is: its name resolver gives
    every address of the name. Several (a list, or
    `host:port,host:port`) become one static address list (`ipv4:` or
    `ipv6:`); names in it are resolved once, here (IPv4 when every one has
    an IPv4 address). Returns (target, the first name given, for TLS).
    """
    if isinstance(target, str) and target.partition(":")[0] in GRPC_SCHEMES:
        return target, None
    targets = target.split(",") if isinstance(target, str) else list(target)
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0], None
    resolved = [_resolve(t) for t in targets]
    for version, index in ((4, 0), (6, 1)):
        if all(r[index] for r in resolved):
            return f"ipv{version}:" + ",".join(r[index] for r in resolved), targets[0]
    raise ValueError(f"{targets} do not all have an IPv4 or all an IPv6 address; "
                     "give one family, or one DNS name (dns:///name:port)")


class StreamInterrupted(grpc.RpcError):
    """A generation stream broke after it had delivered text and could not be
    resumed (a sampled request without a seed, or a replica that answered
    differently). `code()` is the status of the break."""

    def __init__(self, message, code=grpc.StatusCode.UNAVAILABLE):
        super().__init__(message)
        self._code, self._details = code, message

    def code(self):
        return self._code

    def details(self):
        return self._details


class _Delivered:
    """What a generation stream has given its caller, to skip it when the
    same request is answered again from the start."""

    def __init__(self):
        self.ids, self.text = [], ""

    def fresh(self, seen_ids, seen_text, delta):
        """The part of `delta` (which follows `seen_ids` ids and `seen_text`
        characters of this answer) the caller does not have yet."""
        old_ids = self.ids[seen_ids:seen_ids + len(delta.token_ids)]
        old_text = self.text[seen_text:seen_text + len(delta.text)]
        if (list(delta.token_ids[:len(old_ids)]) != old_ids
                or delta.text[:len(old_text)] != old_text):
            raise StreamInterrupted("the replica that took over the stream answered "
                                    "differently from the one that broke off")
        ids, text = list(delta.token_ids[len(old_ids):]), delta.text[len(old_text):]
        self.ids.extend(ids)
        self.text += text
        return ids, text


class Client:
    """gRPC client for the Generation stream and TF Serving's Predict, over one
    server or balanced across replicas.

    Several targets (a list, or `"host:port,host:port"`) or a name that
    resolves to several addresses (`"dns:///keras-llm.NAMESPACE.svc.cluster.local:8500"`,
    a Kubernetes headless service; re-resolved when a connection drops) are
    balanced by gRPC's `round_robin` policy: each call, each new stream
    included, goes to the next ready replica. A call that fails with
    UNAVAILABLE before any response arrived (a replica down or gone) is retried
    by gRPC's retry policy on another: Generate, Predict, GetModelMetadata,
    GetModelStatus and health checks (`max_attempts` in all, with backoff).
    gRPC does not retry a call once a response arrived: a generation stream
    that breaks with UNAVAILABLE after that is re-issued by the client: from the start when nothing was delivered yet;
    when text was delivered and the request is deterministic (greedy, or a
    `seed` given), the replay's already-delivered tokens are checked and
    skipped, so the caller sees each token and character once; else
    `StreamInterrupted` is raised. `generate` re-issues the whole request.
    Every attempt of a call fits in one deadline, `timeout` from its start.

    Args:
        target: `host:port`, any gRPC target (`dns:///name:port`), or several
            `host:port`s (a list or comma-separated; names are resolved once).
        timeout: deadline of each call in seconds (all its attempts).
        api_key: sent as `authorization: Bearer KEY` metadata on every call.
        root_certificates: PEM bytes of the CA to trust: TLS (None: plain,
            unless a client certificate is given; b"": the system's CAs).
            With several targets, the first one's host name is checked
            against every replica's certificate.
        private_key, certificate_chain: PEM bytes of a client certificate,
            for servers with `client_verify`.
        max_attempts: tries of one call (gRPC retries at most 5).

    Attributes:
        reissued: Generate calls sent again after a replica broke them off.
        resumed: of those, streams that went on after delivered text.
    """

    def __init__(self, target, timeout=300.0, api_key=None, root_certificates=None,
                 private_key=None, certificate_chain=None, max_attempts=5):
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.reissued = self.resumed = 0
        self._count_lock = threading.Lock()
        target, authority = channel_target(target)
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.enable_retries", 1),
                   ("grpc.service_config", service_config(max_attempts))]
        if root_certificates is None and certificate_chain is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            if authority:
                options.append(("grpc.default_authority", authority))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates or None, private_key=private_key,
                certificate_chain=certificate_chain)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.channel.close()

    def health(self, service=""):
        """The server's (one replica's) gRPC health status name, e.g. "SERVING"."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # pylint: disable=import-outside-toplevel

        response = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout,
            metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def stream_responses(self, prompt=None, chat=False, system="", model_name="",
                         messages=None, **sampling):
        """Yield the raw `GenerateResponse`s (deltas, then one summary).

        A stream re-issued after a break yields only the new part of each
        delta; its summary (whole text and ids) is the replay's.

        Args:
            prompt: text, or a list of token ids; None with `messages`.
            chat: wrap a text prompt in the model's chat template.
            system: system message for `chat`.
            model_name: empty for the server's only model.
            messages: instead of a prompt, a conversation
                `[{"role": "system" | "user" | "assistant", "content": str}, ...]`
                that the server renders with the model's chat template.
            **sampling: `SamplingOptions` fields (`max_new_tokens`, ...).
        """
        request = self._request(prompt, chat, system, model_name, messages, sampling)
        resumable = not sampling.get("temperature") or "seed" in sampling
        delivered = _Delivered()
        for attempt, remaining in self._attempts():
            seen_ids = seen_text = 0
            started = False
            call = self.generation.Generate(request, timeout=remaining, metadata=self.metadata)
            try:
                for response in call:
                    started = True
                    if not response.HasField("delta"):
                        yield response
                        return
                    delta = response.delta
                    ids, text = delivered.fresh(seen_ids, seen_text, delta)
                    seen_ids += len(delta.token_ids)
                    seen_text += len(delta.text)
                    if ids or text:
                        yield generation_pb2.GenerateResponse(
                            delta=generation_pb2.Delta(text=text, token_ids=ids))
            except grpc.RpcError as error:
                if not (started and self._retryable(error, attempt)):
                    raise
                given = bool(delivered.ids or delivered.text)
                if given and not resumable:
                    raise StreamInterrupted(
                        f"the stream broke off ({error.code().name}: {error.details()}) after "
                        "delivering text, and a sampled request without a seed cannot be "
                        "resumed: give a seed, or retry the whole request",
                        error.code()) from error
                self._backoff(attempt, resumed=given)
            finally:
                call.cancel()  # the caller stopped early: free the server's slot
        raise AssertionError("unreachable")

    def stream(self, prompt=None, **kwargs):
        """Yield text deltas; the summary is kept in `self.last_summary`."""
        self.last_summary = None
        for response in self.stream_responses(prompt, **kwargs):
            if response.HasField("delta"):
                if response.delta.text:
                    yield response.delta.text
            else:
                self.last_summary = response.summary

    def generate(self, prompt=None, chat=False, system="", model_name="", messages=None,
                 **sampling):
        """The finished `Summary` (text, token ids, finish reason, timings);
        a request broken off by a replica is sent again whole."""
        request = self._request(prompt, chat, system, model_name, messages, sampling)
        for attempt, remaining in self._attempts():
            started = False
            try:
                for response in self.generation.Generate(request, timeout=remaining,
                                                         metadata=self.metadata):
                    started = True
                    if response.HasField("summary"):
                        return response.summary
                return None
            except grpc.RpcError as error:
                if not (started and self._retryable(error, attempt)):
                    raise
                self._backoff(attempt, resumed=False)
        raise AssertionError("unreachable")

    @staticmethod
    def _request(prompt, chat, system, model_name, messages, sampling):
        request = generation_pb2.GenerateRequest(
            model_name=model_name, chat=chat, system=system,
            sampling=generation_pb2.SamplingOptions(**sampling))
        if messages is not None:
            if prompt is not None:
                raise ValueError("give a prompt or messages, not both")
            request.messages.extend(
                generation_pb2.ChatMessage(role=m["role"], content=m["content"])
                for m in messages)
        elif isinstance(prompt, str):
            request.text = prompt
        elif prompt is not None:
            request.ids.ids.extend(int(t) for t in prompt)
        return request

    def _attempts(self):
        """(attempt number, seconds left) for each try of one call."""
        deadline = time.monotonic() + self.timeout
        for attempt in range(1, self.max_attempts + 1):
            yield attempt, max(deadline - time.monotonic(), 0.001)

    def _retryable(self, error, attempt):
        """Whether a Generate call that `error` broke off after it started is
        sent again (before its first response, gRPC's retry policy did)."""
        return (not isinstance(error, StreamInterrupted) and attempt < self.max_attempts
                and error.code() == grpc.StatusCode.UNAVAILABLE)

    def _backoff(self, attempt, resumed):
        with self._count_lock:
            self.reissued += 1
            self.resumed += resumed
        time.sleep(min(0.1 * 2 ** (attempt - 1), 1.0))

    def predict(self, model_name, prompts, signature_name="serving_default", **inputs):
        """TF Serving `Predict`: string prompts (plus any other named inputs)."""
        return self._predict(model_name, signature_name,
                             {"prompt": np.array(prompts, dtype=object), **inputs})

    def predict_ids(self, model_name, prompt_ids, max_new_tokens=128, temperature=0.0,
                    top_k=0, top_p=1.0, seed=0):
        """TF Serving `Predict` on `generate_ids`: lists of prompt ids, right-padded."""
        batch = len(prompt_ids)
        width = max(len(p) for p in prompt_ids)
        ids = np.zeros([batch, width], np.int32)
        for row, p in enumerate(prompt_ids):
            ids[row, :len(p)] = p
        rows = lambda value, dtype: np.full([batch], value, dtype)  # noqa: E731
        return self._predict(model_name, "generate_ids", {
            "token_ids": ids, "num_tokens": np.array([len(p) for p in prompt_ids], np.int32),
            "max_new_tokens": rows(max_new_tokens, np.int32),
            "temperature": rows(temperature, np.float32), "top_k": rows(top_k, np.int32),
            "top_p": rows(top_p, np.float32), "seed": rows(seed, np.int32)})

    def _predict(self, model_name, signature_name, inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature_name
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self.prediction.Predict(request, timeout=self.timeout,
                                           metadata=self.metadata)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
