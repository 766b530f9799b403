"""HTTP next to gRPC (`keras-llm serve --rest_api_port P`), over the same engines.

Routes (Starlette on uvicorn, in its own thread and event loop):

- the OpenAI API at `/v1` and `/openai/v1` (KServe's layout):
  `GET /models`, `POST /chat/completions`, `POST /completions`;
- TF Serving's REST API: `GET /v1/models/NAME[/versions/V|/labels/L]`,
  `GET .../metadata`, `POST .../NAME[/versions/V|/labels/L]:predict`
  (row `instances` or columnar `inputs`, `{"b64": ...}` strings);
- `GET /health` (200 once SERVING, 503 while loading or draining),
  `POST /tokenize` and `/detokenize`, Prometheus metrics at `/metrics`
  (and at the monitoring config's path).

Generation requests join the engine's slots like gRPC ones; tokens reach
the event loop through `call_soon_threadsafe`, so a stream holds no thread.
`GET /v1/models` lists models in OpenAI's shape; `GET /v1/models/NAME` keeps
TF Serving's meaning.
"""

import asyncio
import base64
import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid

import anyio
import grpc
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from keras_llm.runtime.engine import EngineStopped, InvalidRequest, QueueFull
from keras_llm.runtime.params import InvalidParams, SamplingParams
from keras_llm.serving.server import (ServingError, check_inputs, predict, record_request,
                                      result_summary)

LOG = logging.getLogger("keras_llm.serving.http")

# TF Serving's mapping of status codes to HTTP (its REST handler's).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Fields that would change what OpenAI's API generates but that keras-llm
# does not do: rejected (400, naming the field) rather than ignored.
UNSUPPORTED = {
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "repetition_penalty": lambda v: v not in (None, 1, 1.0),
    "logit_bias": bool,
    "tools": bool,
    "functions": bool,
    "tool_choice": lambda v: v not in (None, "none"),
    "function_call": lambda v: v not in (None, "none"),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "best_of": lambda v: v not in (None, 1),
    "suffix": bool,
    "prediction": bool,
    "audio": bool,
    "modalities": lambda v: v not in (None, ["text"]),
    "guided_json": bool, "guided_regex": bool, "guided_choice": bool, "guided_grammar": bool,
}

MAX_BODY_BYTES = 8 << 20  # as gRPC's MAX_MESSAGE_BYTES


class ApiError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status, message, param=None, code=None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "invalid_request_error",
                             404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


class _Events:
    """Engine events into the event loop (the engine thread calls `put`)."""

    def __init__(self, loop, queue, tag):
        self.loop, self.queue, self.tag = loop, queue, tag

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, item))


def _param_of(message):
    """The field an `InvalidParams` message is about (its first word)."""
    word = message.split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens", "stop_ids": "stop_token_ids"}.get(word, word)


def _number(body, name, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
        return int(value)
    return float(value)


class Frontend:
    """The HTTP application over a running `serving.server.Server`'s models.

    Args:
        server: the `Server` (its `servables`, `manager`, `metrics`, `serving`).
        api_key: if set, every route but `/health` needs `Authorization: Bearer KEY`.
        monitoring_path: where Prometheus metrics are also served (TF Serving's
            `--monitoring_config_file` path), or None.
        timeout_s: deadline of a non-streaming request (504 past it).
    """

    def __init__(self, server, api_key=None, monitoring_path=None, timeout_s=None):
        self.server = server
        self.timeout_s = timeout_s or None
        self.api_key = api_key.encode() if api_key else None
        self.limiter = anyio.CapacityLimiter(256)  # blocking Predict calls at once
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]
        if monitoring_path and monitoring_path != "/metrics":
            routes.append(Route(monitoring_path, self.prometheus, methods=["GET"]))
        for prefix in ("/v1", "/openai/v1"):
            routes += [Route(f"{prefix}/models", self.list_models, methods=["GET"]),
                       Route(f"{prefix}/chat/completions", self.chat_completions,
                             methods=["POST"]),
                       Route(f"{prefix}/completions", self.completions, methods=["POST"])]
        routes.append(Route("/openai/v1/models/{name}", self.openai_model, methods=["GET"]))
        routes.append(Route("/v1/models/{rest:path}", self.tf_serving, methods=["GET", "POST"]))
        self.app = Starlette(routes=routes)

    async def __call__(self, scope, receive, send):
        if (self.api_key is not None and scope["type"] == "http"
                and scope["path"] != "/health"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):
                message = "missing or wrong API key (send 'Authorization: Bearer KEY')"
                body = (ApiError(401, message, code="invalid_api_key").body()
                        if self._openai_path(scope["path"]) else {"error": message})
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _openai_path(path):
        return path.startswith("/openai/") or path in (
            "/v1/models", "/v1/chat/completions", "/v1/completions")

    # ----- models -----------------------------------------------------------

    async def _wait_while_replaced(self, name):
        """Let a request for a model between versions (a resource-preserving
        transition) wait for the new one, off the event loop."""
        servables = self.server.servables
        if servables.replacing:
            await asyncio.to_thread(servables.wait_while_replaced,
                                    name if isinstance(name, str) and name else None)

    def _model(self, name):
        """The served model for an OpenAI request's `model` (the only one
        when empty); 503 while it loads, 404 when unknown."""
        names = self.server.servables.names()
        configured = sorted(self.server.manager.base_paths)
        if not name:
            if len(configured) != 1:
                raise ApiError(400, f"say which model: one of {configured}", param="model")
            name = configured[0]
        if not isinstance(name, str):
            raise ApiError(400, "model must be a string", param="model")
        if name not in names:
            if name in configured or self.server.loading:
                raise ApiError(503, f"model {name!r} is loading", code="model_loading")
            raise ApiError(404, f"The model {name!r} does not exist (served: {names})",
                           param="model", code="model_not_found")
        return self.server.servables.lookup(name)

    async def list_models(self, request):
        del request
        data = [{"id": name, "object": "model", "created": int(model.created),
                 "owned_by": "keras-llm", "max_model_len": model.engine.max_length}
                for name, model in ((n, self.server.servables.lookup(n))
                                    for n in self.server.servables.names()) if model]
        return JSONResponse({"object": "list", "data": data})

    async def openai_model(self, request):
        try:
            model = self._model(request.path_params["name"])
        except ApiError as error:
            return error.response()
        return JSONResponse({"id": model.name, "object": "model", "created": int(model.created),
                             "owned_by": "keras-llm"})

    # ----- OpenAI: shared ---------------------------------------------------

    @staticmethod
    async def _json(request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    @staticmethod
    def _sampling(body, engine, prompt_len, chat):
        """`SamplingParams` of an OpenAI request; raises ApiError."""
        for field, bad in UNSUPPORTED.items():
            if field in body and bad(body[field]):
                raise ApiError(400, f"{field} is not supported by keras-llm", param=field)
        n = body.get("n", 1)
        if n not in (None, 1) or isinstance(n, bool):
            raise ApiError(400, "only n=1 is supported", param="n")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        limit = _number(body, name, None, int)
        if limit is None:
            room = engine.max_length - engine.backend.prompt_positions(prompt_len, 0)
            default = engine.config.default_max_new_tokens if chat else 16
            limit = max(min(default, room), 1)
        elif limit < 1:
            raise ApiError(400, f"{name} must be at least 1, got {limit}", param=name)
        temperature = _number(body, "temperature", 1.0)
        if temperature > 2.0:
            raise ApiError(400, f"temperature must be in [0, 2], got {temperature}",
                           param="temperature")
        top_k = _number(body, "top_k", 0, int)
        top_k = 0 if top_k == -1 else top_k  # vLLM's "all tokens"
        seed = _number(body, "seed", None, int)
        if seed is None:
            seed = secrets.randbits(31) if temperature > 0 else 0
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list)
                                 or not all(isinstance(s, str) for s in stop)):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        stop_ids = body.get("stop_token_ids") or ()
        if not isinstance(stop_ids, list) and stop_ids != ():
            raise ApiError(400, "stop_token_ids must be a list of integers",
                           param="stop_token_ids")
        if chat:
            logprobs = None
            if body.get("logprobs"):
                logprobs = _number(body, "top_logprobs", 0, int)
            elif body.get("top_logprobs") is not None:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        else:
            logprobs = _number(body, "logprobs", None, int)
        params = SamplingParams(
            max_new_tokens=limit, temperature=temperature, top_k=top_k,
            top_p=_number(body, "top_p", 1.0), seed=seed, stop=tuple(stop or ()),
            stop_ids=tuple(stop_ids), ignore_eos=bool(body.get("ignore_eos", False)),
            logprobs=logprobs)
        try:
            return params.validate()
        except InvalidParams as error:
            raise ApiError(400, str(error), param=_param_of(str(error))) from None

    @staticmethod
    def _messages(body):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ApiError(400, f"messages[{i}] must be an object", param="messages")
            role, content = message.get("role"), message.get("content")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role must be system, user or assistant, "
                                    f"got {role!r}", param="messages")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string",
                               param="messages")
            out.append({"role": role, "content": content})
        return out

    async def _submit(self, body, encode, chat):
        """Resolve the model, encode the prompts and queue them: returns
        `(model, prompts, params, queue, jobs)`. A version retired between
        lookup and submit is retried on its successor."""
        loop = asyncio.get_running_loop()
        for _ in range(5):
            await self._wait_while_replaced(body.get("model"))
            model = self._model(body.get("model"))
            exported = model.engine
            try:
                prompts = encode(exported)
            except (ValueError, TypeError) as error:
                raise ApiError(400, str(error), param="messages" if chat else "prompt") from None
            params = self._sampling(body, exported.engine, max(len(p) for p in prompts), chat)
            queue, jobs = asyncio.Queue(), []
            try:
                for index, prompt in enumerate(prompts):
                    jobs.append(exported.engine.submit(prompt, params,
                                                       events=_Events(loop, queue, index)))
            except InvalidRequest as error:
                self._cancel(jobs)
                raise ApiError(400, str(error), param=_param_of(str(error))) from None
            except QueueFull as error:
                self._cancel(jobs)
                raise ApiError(429, str(error), code="queue_full") from None
            except EngineStopped:
                self._cancel(jobs)
                await asyncio.sleep(0.05)
                continue
            return model, prompts, params, queue, jobs
        raise ApiError(503, "the server is shutting down")

    @staticmethod
    def _cancel(jobs):
        for job in jobs:
            job.cancel()

    def _finished(self, model, result, gaps):
        record_request(self.server.metrics, model.name, result_summary(result), gaps, "http")

    async def _collect(self, model, queue, jobs):
        """Wait for every job; returns their `Result`s."""
        results, gaps, last = [None] * len(jobs), [], {}
        try:
            async with asyncio.timeout(self.timeout_s):
                while any(r is None for r in results):
                    index, event = await queue.get()
                    if event[0] == "done":
                        results[index] = event[1]
                    elif event[2]:
                        now = time.perf_counter()
                        if index in last:
                            gaps.append(now - last[index])
                        last[index] = now
        except TimeoutError:
            raise ApiError(504, f"request took longer than {self.timeout_s} s",
                           code="timeout") from None
        finally:
            if any(r is None for r in results):
                self._cancel(jobs)
        for index, result in enumerate(results):  # the gaps of all, recorded once
            self._finished(model, result, gaps if index == 0 else ())
            if result.finish_reason == "error":
                raise ApiError(500, "generation failed")
        return results

    @staticmethod
    def _finish_reason(result):
        return "length" if result.finish_reason == "length" else "stop"

    @staticmethod
    def _usage(results):
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    @staticmethod
    def _token_text(tokenizer, token_id):
        return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def _chat_logprobs(self, tokenizer, entries):
        def one(token_id, logprob):
            data = tokenizer.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob,
                    "bytes": list(data)}
        return {"content": [{**one(e.token_id, e.logprob),
                             "top_logprobs": [one(i, lp) for i, lp in e.top]}
                            for e in entries], "refusal": None}

    def _completion_logprobs(self, tokenizer, entries, offset):
        tokens, offsets = [], []
        for e in entries:
            text = self._token_text(tokenizer, e.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(tokenizer, i): lp for i, lp in e.top}
                                 for e in entries],
                "text_offset": offsets}

    def _stream(self, model, queue, jobs, make_chunk, final_chunks):
        """Server-sent events: a chunk per delta, then the final chunks and
        `[DONE]`. Closing (client gone) cancels the jobs."""
        async def events():
            results = [None] * len(jobs)
            gaps, last = [], {}
            try:
                while any(r is None for r in results):
                    index, event = await queue.get()
                    if event[0] == "done":
                        results[index] = event[1]
                        if event[1].finish_reason == "error":
                            error = ApiError(500, "generation failed").body()
                            yield f"data: {json.dumps(error)}\n\n"
                            break
                        continue
                    _, text, ids, scores = event
                    if ids:
                        now = time.perf_counter()
                        if index in last:
                            gaps.append(now - last[index])
                        last[index] = now
                    if text or scores:
                        yield f"data: {json.dumps(make_chunk(index, text, scores))}\n\n"
                else:
                    for index, result in enumerate(results):
                        self._finished(model, result, gaps if index == 0 else ())
                    for chunk in final_chunks(results):
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if any(r is None for r in results):
                    self._cancel(jobs)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ----- OpenAI: chat -----------------------------------------------------

    async def chat_completions(self, request):
        try:
            body = await self._json(request)
            messages = self._messages(body)

            def encode(exported):
                return [exported.encode(messages=messages)]

            model, _, params, queue, jobs = await self._submit(body, encode, chat=True)
        except ApiError as error:
            return error.response()
        tokenizer = model.engine.tokenizer
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": model.name,
                "system_fingerprint": f"keras-llm-v{model.version}"}
        with_logprobs = params.logprobs is not None
        if not body.get("stream"):
            try:
                [result] = await self._collect(model, queue, jobs)
            except ApiError as error:
                return error.response()
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text,
                                              "refusal": None},
                      "logprobs": (self._chat_logprobs(tokenizer, result.logprobs)
                                   if with_logprobs else None),
                      "finish_reason": self._finish_reason(result)}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                                 "usage": self._usage([result])})
        options = body.get("stream_options") or {}
        usage = bool(isinstance(options, dict) and options.get("include_usage"))
        chunk_head = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if usage else {}
        first = [True]

        def make_chunk(index, text, scores):
            delta = {"content": text}
            if first[0]:
                delta["role"] = "assistant"
                first[0] = False
            return {**chunk_head, **extra, "choices": [{
                "index": index, "delta": delta,
                "logprobs": (self._chat_logprobs(tokenizer, scores or [])
                             if with_logprobs else None),
                "finish_reason": None}]}

        def final_chunks(results):
            [result] = results
            delta = {"role": "assistant", "content": ""} if first[0] else {}
            yield {**chunk_head, **extra, "choices": [{
                "index": 0, "delta": delta, "logprobs": None,
                "finish_reason": self._finish_reason(result)}]}
            if usage:
                yield {**chunk_head, "choices": [], "usage": self._usage(results)}

        return self._stream(model, queue, jobs, make_chunk, final_chunks)

    # ----- OpenAI: completions ----------------------------------------------

    @staticmethod
    def _prompts(body):
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return prompt
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return [prompt]
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in p) for p in prompt):
                return prompt
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt")

    async def completions(self, request):
        try:
            body = await self._json(request)
            prompts = self._prompts(body)
            echo = bool(body.get("echo"))
            if echo and body.get("logprobs") is not None:
                raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported",
                               param="echo")

            def encode(exported):
                return [exported.encode(p) if isinstance(p, str) else list(p)
                        for p in prompts]

            model, ids, params, queue, jobs = await self._submit(body, encode, chat=False)
        except ApiError as error:
            return error.response()
        tokenizer = model.engine.tokenizer
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        del ids
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model.name, "object": "text_completion",
                "system_fingerprint": f"keras-llm-v{model.version}"}
        with_logprobs = params.logprobs is not None
        if not body.get("stream"):
            try:
                results = await self._collect(model, queue, jobs)
            except ApiError as error:
                return error.response()
            choices = [{"index": i, "text": (texts[i] if echo else "") + r.text,
                        "logprobs": (self._completion_logprobs(tokenizer, r.logprobs, 0)
                                     if with_logprobs else None),
                        "finish_reason": self._finish_reason(r)}
                       for i, r in enumerate(results)]
            return JSONResponse({**head, "choices": choices, "usage": self._usage(results)})
        options = body.get("stream_options") or {}
        usage = bool(isinstance(options, dict) and options.get("include_usage"))
        extra = {"usage": None} if usage else {}
        offsets = [0] * len(jobs)
        echoed = [not echo] * len(jobs)

        def make_chunk(index, text, scores):
            if not echoed[index]:
                text, echoed[index] = texts[index] + text, True
            logprobs = None
            if with_logprobs:
                logprobs = self._completion_logprobs(tokenizer, scores or [], offsets[index])
            offsets[index] += len(text)
            return {**head, **extra, "choices": [{"index": index, "text": text,
                                                  "logprobs": logprobs,
                                                  "finish_reason": None}]}

        def final_chunks(results):
            for index, result in enumerate(results):
                text = "" if echoed[index] else texts[index]
                yield {**head, **extra, "choices": [{
                    "index": index, "text": text, "logprobs": None,
                    "finish_reason": self._finish_reason(result)}]}
            if usage:
                yield {**head, "choices": [], "usage": self._usage(results)}

        return self._stream(model, queue, jobs, make_chunk, final_chunks)

    # ----- tokenize ---------------------------------------------------------

    async def tokenize(self, request):
        try:
            body = await self._json(request)
            model = self._model(body.get("model"))
            tokenizer = model.engine.tokenizer
            if "messages" in body:
                text = tokenizer.apply_chat_template(self._messages(body))
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise ApiError(400, "give prompt (a string) or messages", param="prompt")
            ids = tokenizer.encode(text)
        except ValueError as error:
            return ApiError(400, str(error)).response()
        except ApiError as error:
            return error.response()
        return JSONResponse({"tokens": ids, "count": len(ids),
                             "max_model_len": model.engine.max_length})

    async def detokenize(self, request):
        try:
            body = await self._json(request)
            model = self._model(body.get("model"))
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ApiError(400, "tokens must be a list of integers", param="tokens")
            size = model.engine.tokenizer.vocabulary_size
            if any(not 0 <= t < size for t in ids):
                raise ApiError(400, f"token ids must be in [0, {size})", param="tokens")
        except ApiError as error:
            return error.response()
        return JSONResponse({"prompt": model.engine.tokenizer.decode(ids)})

    # ----- health and metrics -----------------------------------------------

    async def health(self, request):
        del request
        if self.server.serving:
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    async def prometheus(self, request):
        del request
        import prometheus_client as prom  # pylint: disable=import-outside-toplevel
        return Response(prom.generate_latest(self.server.metrics.registry),
                        media_type=prom.CONTENT_TYPE_LATEST)

    # ----- TF Serving REST --------------------------------------------------

    _TF_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|"
                          r"/labels/(?P<label>[^/:]+))?(?P<tail>/metadata|:\w+)?$")

    async def tf_serving(self, request):
        match = self._TF_PATH.match(request.path_params["rest"])
        if match is None:
            return JSONResponse({"error": f"Malformed request: {request.url.path}"},
                                status_code=404)
        name, version, label, tail = match.group("name", "version", "label", "tail")
        try:
            if request.method == "GET" and tail in (None, "/metadata"):
                return self._tf_status(name, version, label, tail)
            if request.method == "POST" and tail == ":predict":
                return await self._tf_predict(request, name, version, label)
            if request.method == "POST" and tail in (":classify", ":regress"):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   "keras-llm serves generation models: use :predict")
            return JSONResponse({"error": f"Malformed request: {request.method} "
                                          f"{request.url.path}"}, status_code=404)
        except ServingError as error:
            return JSONResponse({"error": error.message},
                                status_code=HTTP_STATUS.get(error.code, 500))

    def _tf_status(self, name, version, label, tail):
        from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
        from keras_llm.serving.protos import tf_serving  # pylint: disable=import-outside-toplevel
        model = self.server.servables.resolve(name, version, label)
        if tail is None:
            state = "AVAILABLE" if model.engine.ready.is_set() else "LOADING"
            return JSONResponse({"model_version_status": [{
                "version": str(model.version), "state": state,
                "status": {"error_code": "OK", "error_message": ""}}]})
        signature_map = tf_serving.SignatureDefMap()
        for key, value in model.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        return JSONResponse({
            "model_spec": {"name": model.name, "signature_name": "",
                           "version": str(model.version)},
            "metadata": {"signature_def": json_format.MessageToDict(
                signature_map, preserving_proto_field_name=True)}})

    async def _tf_predict(self, request, name, version, label):
        await self._wait_while_replaced(name)
        model = self.server.servables.resolve(name, version, label)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"JSON Parse error: {error}") from None
        if not isinstance(body, dict):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "JSON Value: is not an object")
        signature = body.get("signature_name", "serving_default")
        if not isinstance(signature, str):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "signature_name must be a string")
        row = "instances" in body
        if row == ("inputs" in body):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Missing 'inputs' or 'instances' key" if not row else
                               "Not formatted correctly expecting only one of 'inputs' or "
                               "'instances' keys to exist")
        if signature not in model.input_specs:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Serving signature key \"{signature}\" not found.")
        names = sorted(model.input_specs[signature])
        columns = rest_columns(body["instances"] if row else body["inputs"], names, row)
        spec = check_inputs(model, signature, columns)
        inputs = {key: rest_array(key, value, spec[key].dtype) for key, value in columns.items()}
        cancels = []
        try:
            with anyio.fail_after(self.timeout_s):
                outputs = await anyio.to_thread.run_sync(
                    predict, model, signature, inputs, (), cancels.append,
                    limiter=self.limiter, abandon_on_cancel=True)
        except TimeoutError:
            for cancel in cancels:
                cancel()
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"Request took longer than {self.timeout_s} s") from None
        return JSONResponse(rest_outputs(outputs, row))


# ----- TF Serving's REST formats --------------------------------------------

def _is_b64(value):
    return isinstance(value, dict) and set(value) == {"b64"}


def rest_columns(data, names, row):
    """`{input name: nested list}` of a request's `instances` (row) or
    `inputs` (columnar) value."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not row:
        if isinstance(data, dict) and not _is_b64(data):
            return dict(data)
        if len(names) != 1:
            raise ServingError(bad, f"'inputs' must name the signature's inputs {names}")
        return {names[0]: data}
    if not isinstance(data, list) or not data:
        raise ServingError(bad, "'instances' must be a non-empty list")
    named = [isinstance(i, dict) and not _is_b64(i) for i in data]
    if any(named) and not all(named):
        raise ServingError(bad, "instances must be all objects of named inputs or all values")
    if not all(named):
        if len(names) != 1:
            raise ServingError(bad, f"instances must be objects naming the inputs {names}")
        return {names[0]: data}
    keys = set(data[0])
    if any(set(i) != keys for i in data):
        raise ServingError(bad, "every instance must name the same inputs")
    return {key: [i[key] for i in data] for key in keys}


def _strings(value, key):
    if isinstance(value, list):
        return [_strings(v, key) for v in value]
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {key}: invalid base64") from None
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input {key}: expects strings, got {type(value).__name__}")


def rest_array(key, value, dtype):
    """A numpy array of `dtype` (a `serving.tensors.DType`) from JSON."""
    try:
        if dtype.name == "string":
            array = np.array(_strings(value, key), dtype=object)
            if array.dtype != object or any(not isinstance(v, bytes) for v in array.reshape(-1)):
                raise ValueError("ragged or mixed values")
            return array
        if dtype.is_floating:
            def check(v):
                if isinstance(v, list):
                    return [check(x) for x in v]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"expects numbers, got {v!r}")
                return v
            return np.array(check(value), dtype=dtype.as_numpy_dtype)
        if dtype.is_integer or dtype.is_bool:
            def check_int(v):
                if isinstance(v, list):
                    return [check_int(x) for x in v]
                if dtype.is_bool and isinstance(v, bool):
                    return v
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"expects integers, got {v!r}")
                return v
            array = np.array(check_int(value))
            limits = np.iinfo(dtype.as_numpy_dtype) if dtype.is_integer else None
            if limits is not None and array.size and (array.min() < limits.min
                                                      or array.max() > limits.max):
                raise ValueError(f"values outside {dtype.name}")
            return array.astype(dtype.as_numpy_dtype)
    except ServingError:
        raise
    except (ValueError, TypeError, OverflowError) as error:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: {error}") from None
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input {key}: dtype {dtype.name} is not supported over REST")


def _json_value(key, array):
    if array.dtype == object:
        def text(v):
            if isinstance(v, bytes):
                if key.endswith("_bytes"):
                    return {"b64": base64.b64encode(v).decode("ascii")}
                return v.decode("utf-8", errors="replace")
            return v
        return np.vectorize(text, otypes=[object])(array).tolist() if array.size else []
    return array.tolist()


def rest_outputs(outputs, row):
    """TF Serving's response body: `predictions` (row) or `outputs` (columnar)."""
    values = {k: _json_value(k, np.asarray(v)) for k, v in outputs.items()}
    if not row:
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    batch = len(next(iter(values.values())))
    return {"predictions": [{k: v[i] for k, v in values.items()} for i in range(batch)]}


class HTTPServer:
    """uvicorn serving `app` on `host:port` in a thread of its own.

    The socket is bound here (port 0 picks one; a port in use is an error,
    never shared); `ssl` is a dict of uvicorn's `ssl_*` options."""

    def __init__(self, app, host, port, ssl=None, grace_seconds=30.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(f"cannot bind HTTP to {host}:{port}: {error.strerror}") from None
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(grace_seconds) or None,
                                **(ssl or {}))
        self.server = uvicorn.Server(config)
        self._socket = sock
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                        name="keras-llm-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start in 30 s")
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server failed to start (see the log)")

    def stop(self, timeout=None):
        """Stop accepting, let open requests finish (up to `timeout` s), stop."""
        self.server.should_exit = True
        self._thread.join(None if timeout is None else timeout + 5)
        if not self._thread.is_alive():
            self._socket.close()
