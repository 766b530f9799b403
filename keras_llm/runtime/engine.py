"""The engine: sequence slots over one backend, a queue, and the scheduler.

Every entry point generates through an `Engine`: `LanguageModel.generate`
and `stream`, the CLI, the gRPC `Generate` stream and TF Serving `Predict`,
the benchmark suite and the optimize report. Requests wait in a bounded
queue, take a free slot (prefill), then advance one token per step together
with every other running request; a finished or cancelled request leaves its
slot at once and the next one joins before the following step. Sampling
(`keras_llm.runtime.sampling`) and stops (`keras_llm.runtime.sequence`)
happen here, on the host, for every backend alike.

The scheduler runs in a background thread once `start()` is called (the
servers); without it, `generate` and `stream` drive it from the caller's
thread (the Python API and the CLI).
"""

import ctypes
import dataclasses
import logging
import queue
import threading
import time

import numpy as np

from keras_llm.runtime.params import InvalidParams, SamplingParams
from keras_llm.runtime.sampling import sample, token_logprobs
from keras_llm.runtime.sequence import Sequence
from keras_llm.runtime.speculative import SPECULATIVE_TOKENS, Speculator, verify

LOG = logging.getLogger("keras_llm.runtime.engine")


class EngineError(Exception):
    """Base of the errors the servers map to status codes."""


class InvalidRequest(EngineError, ValueError):
    """Bad input: INVALID_ARGUMENT / HTTP 400."""


class QueueFull(EngineError):
    """Too many waiting requests: RESOURCE_EXHAUSTED / HTTP 429."""


class EngineStopped(EngineError):
    """This engine takes no new work (retired version or shutdown)."""


class _NoText:
    """Decoder for callers that want ids only."""

    def push(self, token):
        del token
        return ""

    def flush(self):
        return ""


@dataclasses.dataclass
class EngineConfig:
    """Operator settings.

    Args:
        max_slots: most sequences decoded together.
        max_queue: most requests waiting for a slot; beyond it submit fails.
        max_length: cache positions per slot (prompt plus new tokens); the
            backend may grant fewer.
        default_max_new_tokens: used when a request asks for 0 new tokens
            through a server (`SamplingParams(max_new_tokens=0)` otherwise
            means none).
        speculative_tokens: draft tokens per verify call, with a draft
            model (`keras_llm.runtime.speculative`).
    """

    max_slots: int = 16
    max_queue: int = 64
    max_length: int = 1024
    default_max_new_tokens: int = 128
    speculative_tokens: int = SPECULATIVE_TOKENS


@dataclasses.dataclass
class Result:
    """A finished request.

    Attributes:
        token_ids: generated ids (a stop id excluded).
        text: their text (cut before a stop string).
        finish_reason: "stop", "length", "cancelled" or "error".
        prompt_tokens: prompt length.
        queue_s, time_to_first_token_s, total_s: from submission.
        decode_s: from the first token to the last.
        logprobs: with `SamplingParams.logprobs`, one `TokenLogprob` per
            generated token; else None.
    """

    token_ids: list
    text: str
    finish_reason: str
    prompt_tokens: int
    queue_s: float
    time_to_first_token_s: float
    decode_s: float
    total_s: float
    logprobs: list | None = None


@dataclasses.dataclass
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives
    (`[(id, logprob)]`, best first)."""

    token_id: int
    logprob: float
    top: list


def _trim_heap():
    """Give the C heap's free pages back to the system (glibc's
    `malloc_trim`; nothing elsewhere): what loading and a burst of requests
    freed stays resident otherwise (about 6 MB after loading SmolLM2)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def decode_rate(results):
    """Tokens after each request's first, per second of the window in which
    all of them decoded together (the batch's aggregate decode tokens/s)."""
    steps = sum(max(len(r.token_ids) - 1, 0) for r in results)
    window = (max(r.total_s for r in results)
              - max(r.time_to_first_token_s for r in results)) if results else 0.0
    return steps / window if window > 0 and steps else 0.0


class Request:
    """One request; the scheduler puts `("delta", text, ids, logprobs)`
    items into `events` (logprobs: a `TokenLogprob` per id, or None) and
    finally `("done", Result)`. `events` is a `queue.Queue` unless the
    caller gave its own object with a `put` method (the HTTP server's
    bridge into its event loop)."""

    def __init__(self, prompt_ids, params, sequence, events=None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sequence = sequence
        self.events = queue.Queue() if events is None else events
        self.logprobs = None if params.logprobs is None else []
        self.cancelled = threading.Event()
        self.created = time.perf_counter()
        self.started = None
        self.first_token_at = None
        self.last_token_at = None
        self.result = None
        self.error = None
        self.done = threading.Event()

    def cancel(self):
        self.cancelled.set()

    @property
    def finished(self):
        return self.result is not None


class Engine:
    """Generates for many requests at once over one backend.

    Args:
        backend: a `keras_llm.runtime.backend.Backend`.
        tokenizer: has `stop_ids` and `stream_decoder()` (a `HostTokenizer`
            or `BytePairTokenizer`); None for ids-only use.
        config: an `EngineConfig`.
        stop_ids: the model's stop ids (default: the tokenizer's).
        draft: a backend over a smaller model with the same vocabulary:
            while one request decodes, it guesses the next tokens and the
            original checks them in one step (`keras_llm.runtime.speculative`;
            the output stays the original's own). `backend` needs a `verify`
            step (LiteRT files built with `verify_length`).

    Example:
        >>> engine = Engine(LiteRTBackend(path), HostTokenizer.load(model_dir))
        >>> [result] = engine.generate([[1, 4093, 198]], SamplingParams(max_new_tokens=16))
    """

    def __init__(self, backend, tokenizer=None, config=None, stop_ids=None, draft=None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        caps = backend.capabilities
        self.vocabulary_size = caps.vocabulary_size
        self.stop_ids = tuple(stop_ids if stop_ids is not None
                              else (tokenizer.stop_ids if tokenizer is not None else ()))
        slots, length = backend.allocate(min(self.config.max_slots, caps.max_slots),
                                         self.config.max_length)
        self.num_slots, self.max_length = int(slots), int(length)
        self.speculator = None
        if draft is not None:
            if caps.verify_length < 2:
                raise ValueError(f"speculative decoding needs a backend with a verify step; the "
                                 f"{caps.name} backend has none (LiteRT files convert with one)")
            if draft.capabilities.vocabulary_size != caps.vocabulary_size:
                raise ValueError(
                    f"the draft model has {draft.capabilities.vocabulary_size} tokens, the model "
                    f"{caps.vocabulary_size}: a draft must share the model's vocabulary")
            self.speculator = Speculator(draft, self.config.speculative_tokens)
        self._slots = [None] * self.num_slots
        self._waiting = []
        self._admitting = set()  # slots of requests taken from the queue, being prefilled
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = None
        self._driver = threading.Lock()  # one thread runs the scheduler at a time
        self.ready = threading.Event()

    # ----- public interface ------------------------------------------------

    def submit(self, prompt_ids, params, text=True, events=None):
        """Queue a request; raises InvalidRequest, QueueFull or EngineStopped at once.

        `events`: where the request's events go (an object with `put`; only
        with a started engine). Default: a new `queue.Queue`."""
        try:
            params = dataclasses.replace(params).validate()
        except InvalidParams as error:
            raise InvalidRequest(str(error)) from None
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InvalidRequest("empty prompt")
        if min(ids) < 0 or max(ids) >= self.vocabulary_size:
            raise InvalidRequest(f"token ids must be in [0, {self.vocabulary_size})")
        need = self.backend.prompt_positions(len(ids), params.max_new_tokens) + params.max_new_tokens
        if need > self.max_length:
            raise InvalidRequest(
                f"prompt of {len(ids)} tokens plus {params.max_new_tokens} new tokens exceeds "
                f"the per-sequence limit of {self.max_length} positions")
        decoder = (self.tokenizer.stream_decoder() if text and self.tokenizer is not None
                   else _NoText())
        if events is not None and self._thread is None:
            raise ValueError("an events sink needs a started engine")
        request = Request(ids, params, Sequence(params, self.stop_ids, decoder), events)
        with self._lock:
            if self._stopping:
                raise EngineStopped("this engine is no longer taking requests")
            self._drop_cancelled()
            free = sum(slot is None and i not in self._admitting
                       for i, slot in enumerate(self._slots))
            if len(self._waiting) - free >= self.config.max_queue:
                raise QueueFull(f"queue is full ({self.config.max_queue} waiting)")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def generate(self, prompts, params, text=True):
        """Generate for a list of prompts (id lists) together; returns a
        `Result` per prompt, in order."""
        requests = [self.submit(p, params, text) for p in prompts]
        for request in requests:
            self._wait(request)
        return [r.result for r in requests]

    def stream(self, prompt_ids, params):
        """Yield `(text_delta, new_ids)` as tokens come; the last item is the
        `Result`. Closing the generator cancels the request."""
        request = self.submit(prompt_ids, params)
        try:
            while True:
                event = self._next_event(request)
                if event[0] == "done":
                    yield event[1]
                    return
                yield event[1], event[2]
        finally:
            if not request.finished:
                request.cancel()
                self._wait(request)

    def stats(self):
        """Requests decoding in a slot, being prefilled into one, and waiting."""
        with self._lock:
            self._drop_cancelled()
            decoding = sum(s is not None for s in self._slots)
            prefilling = len(self._admitting)
            return {"running": decoding + prefilling, "decoding": decoding,
                    "prefilling": prefilling, "waiting": len(self._waiting)}

    def _drop_cancelled(self):
        """Cancelled requests (client gone, deadline passed) leave the queue
        at once instead of keeping their place until a slot frees up."""
        if any(r.cancelled.is_set() for r in self._waiting):
            keep = []
            for request in self._waiting:
                if request.cancelled.is_set():
                    self._finish(None, "cancelled", request=request)
                else:
                    keep.append(request)
            self._waiting = keep

    def start(self):
        """Run the scheduler in a background thread (servers)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="keras-llm-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def warmup(self):
        """Run every step size the backend compiles once, then a request
        (with a draft model: one that speculates)."""
        rows = [r for r in self.backend.capabilities.row_counts if r <= self.num_slots]
        with self._driver:  # the scheduler thread may be running (and releasing)
            for count in rows or [1]:
                for slot in range(count):
                    self.backend.prefill([0], slot)
                self.backend.step(np.zeros([count], np.int32), np.arange(count))
        # long enough for a speculative step (the draft and the verify step) too
        tokens = 2 + (self.speculator.tokens if self.speculator is not None else 0)
        self.generate([[0]], SamplingParams(max_new_tokens=tokens, ignore_eos=True), text=False)
        self.ready.set()

    def stop(self, timeout=None):
        """Stop taking work; let running and queued requests finish."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----- driving ---------------------------------------------------------

    def _next_event(self, request):
        if self._thread is not None:
            return request.events.get()
        while True:
            try:
                return request.events.get_nowait()
            except queue.Empty:
                self._run_once()

    def _wait(self, request):
        if self._thread is not None:
            request.done.wait()
            return
        while not request.finished:
            self._run_once()

    def _idle(self):
        return not self._waiting and not any(self._slots)

    def _loop(self):
        while True:
            with self._lock:
                idle = self._idle()
            if idle:  # the last sequence is done: its cache memory can go
                with self._driver:
                    self.backend.release()
                    if self.speculator is not None:
                        self.speculator.release()
                _trim_heap()
            with self._lock:
                while not self._stopping and self._idle():
                    self._lock.wait()
                if self._stopping and self._idle():
                    return
            self._run_once()

    def _run_once(self):
        """Admit waiting requests into free slots, then one decode step."""
        with self._driver:
            with self._lock:
                self._drop_cancelled()
                admit = []
                for index, slot in enumerate(self._slots):
                    if slot is None and self._waiting:
                        admit.append((index, self._waiting.pop(0)))
                self._admitting = {index for index, _ in admit}
            try:
                for index, request in admit:
                    self._prefill(index, request)
                    with self._lock:
                        self._admitting.discard(index)
                if any(self._slots):
                    self._step()
            except Exception as error:  # pylint: disable=broad-except
                LOG.exception("engine step failed")
                with self._lock:
                    self._admitting = set()
                for index, request in enumerate(self._slots):
                    if request is not None:
                        self._finish(index, "error", error)
                for _, request in admit:  # admitted, not yet in a slot
                    if not request.finished:
                        self._finish(None, "error", error, request)

    def _prefill(self, index, request):
        if request.cancelled.is_set():
            self._finish(None, "cancelled", request=request)
            return
        request.started = time.perf_counter()
        if request.sequence.done:  # max_new_tokens == 0
            self._finish(None, "length", request=request)
            return
        logits = self.backend.prefill(request.prompt_ids, index, request.params.max_new_tokens)
        with self._lock:  # from prefilling to decoding in one move
            self._slots[index] = request
            self._admitting.discard(index)
        p = request.params
        token = sample(logits[np.newaxis], p.temperature, p.top_k, p.top_p, p.seed, 0)[0]
        self._emit(index, int(token), logits)

    def _step(self):
        rows = [i for i, r in enumerate(self._slots) if r is not None]
        if self.speculator is not None and len(rows) == 1 and self._speculate(rows[0]):
            return
        requests = [self._slots[i] for i in rows]
        tokens = np.array([r.sequence.tokens[-1] for r in requests], np.int32)
        sampled = [r for r in requests if not r.params.greedy]
        scored = any(r.logprobs is not None for r in requests)
        greedy, logits = self.backend.step(tokens, rows, need_logits=bool(sampled) or scored)
        if sampled:
            params = [r.params for r in requests]
            greedy = sample(logits, [p.temperature for p in params], [p.top_k for p in params],
                            [p.top_p for p in params], [p.seed for p in params],
                            [len(r.sequence.tokens) for r in requests])
        for row, (index, token) in enumerate(zip(rows, greedy)):
            self._emit(index, int(token), logits[row] if scored else None)

    def _speculate(self, index):
        """A speculative step for the one decoding request; False when there
        is no room for one (the plain step runs instead)."""
        request = self._slots[index]
        made = len(request.sequence.tokens)
        step = verify(self.backend, self.speculator, index, request, made,
                      request.params.max_new_tokens - made)
        if step is None:
            return False
        for token, logits in zip(*step):
            self._emit(index, token, logits)
            if self._slots[index] is not request:  # it finished
                break
        return True

    def _emit(self, index, token, logits=None):
        request = self._slots[index]
        if request.cancelled.is_set():
            self._finish(index, "cancelled")
            return
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        request.last_token_at = now
        seq = request.sequence
        count = len(seq.tokens)
        delta = seq.push(token)
        new = seq.tokens[count:]
        scores = None
        if new and request.logprobs is not None:
            scores = [TokenLogprob(token, *token_logprobs(logits, token, request.params.logprobs))]
            request.logprobs.extend(scores)
        if delta or new:
            request.events.put(("delta", delta, new, scores))
        if seq.done:
            self._finish(index, seq.finish_reason)

    def _finish(self, index, reason, error=None, request=None):
        if index is not None:
            request = self._slots[index]
            self._slots[index] = None
        if self.speculator is not None:
            self.speculator.forget(request)
        seq = request.sequence
        tail = seq.finish(reason) if not seq.done or reason != seq.finish_reason else ""
        if tail:
            request.events.put(("delta", tail, [], None))
        now = time.perf_counter()
        started = request.started or now
        first = request.first_token_at or now
        request.result = Result(
            token_ids=list(seq.tokens), text=seq.text, finish_reason=seq.finish_reason,
            prompt_tokens=len(request.prompt_ids), queue_s=started - request.created,
            time_to_first_token_s=first - request.created,
            decode_s=(request.last_token_at or first) - first, total_s=now - request.created,
            logprobs=request.logprobs)
        request.error = error
        request.events.put(("done", request.result))
        request.done.set()
