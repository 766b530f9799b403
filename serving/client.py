"""A small client for keras-llm servers (and TF Serving for `predict`).

    from keras_llm.serving.client import Client
    with Client("127.0.0.1:8500") as client:
        for delta in client.stream("Hello!", chat=True):
            print(delta, end="")
        client.generate(messages=[{"role": "user", "content": "Hi!"},
                                  {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "Who are you?"}]).text
        client.predict("smollm2", ["The capital of France is"])["text"]

Every call carries a deadline (`timeout`, seconds).
"""

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc


class Client:
    """gRPC client for the Generation stream and TF Serving's Predict.

    Args:
        target: `host:port`.
        timeout: deadline of each call in seconds.
        api_key: sent as `authorization: Bearer KEY` metadata on every call.
        root_certificates: PEM bytes of the CA to trust: TLS (None: plain,
            unless a client certificate is given; b"": the system's CAs).
        private_key, certificate_chain: PEM bytes of a client certificate,
            for servers with `client_verify`.
    """

    def __init__(self, target, timeout=300.0, api_key=None, root_certificates=None,
                 private_key=None, certificate_chain=None):
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if root_certificates is None and certificate_chain is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
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

    def stream_responses(self, prompt=None, chat=False, system="", model_name="",
                         messages=None, **sampling):
        """Yield the raw `GenerateResponse`s (deltas, then one summary).

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
        yield from self.generation.Generate(request, timeout=self.timeout,
                                            metadata=self.metadata)

    def stream(self, prompt=None, **kwargs):
        """Yield text deltas; the summary is kept in `self.last_summary`."""
        self.last_summary = None
        for response in self.stream_responses(prompt, **kwargs):
            if response.HasField("delta"):
                if response.delta.text:
                    yield response.delta.text
            else:
                self.last_summary = response.summary

    def generate(self, prompt=None, **kwargs):
        """The finished `Summary` (text, token ids, finish reason, timings)."""
        summary = None
        for response in self.stream_responses(prompt, **kwargs):
            if response.HasField("summary"):
                summary = response.summary
        return summary

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
