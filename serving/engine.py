"""The generation engine: sequence slots, one KV cache, dynamic batching.

The engine loads what `export` wrote (`tf.saved_model.load` of a version
directory) and drives its `engine.prefill` / `engine.decode` functions from
one scheduler thread. Requests wait in a bounded queue, take a free slot
(prefill), and then advance one token per step together with every other
running request; a finished or cancelled request leaves its slot at once and
the next one joins before the following step. The server only translates
requests into `submit` calls and reads the `Request.events` queue.
"""

import dataclasses
import json
import logging
import os
import queue
import threading
import time

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  pylint: disable=unused-import  (registers the SavedModel's ops)

from keras_llm.generation import round_up
from keras_llm.tokenizer import BytePairTokenizer

LOG = logging.getLogger("keras_llm.serving.engine")


class EngineError(Exception):
    """Base of the errors the server maps to gRPC status codes."""


class InvalidRequest(EngineError):
    """Bad input: INVALID_ARGUMENT."""


class QueueFull(EngineError):
    """Too many waiting requests: RESOURCE_EXHAUSTED."""


class EngineStopped(EngineError):
    """This engine takes no new work (retired version or shutdown)."""


@dataclasses.dataclass
class EngineConfig:
    """Operator settings.

    Args:
        max_slots: most sequences decoded together.
        max_queue: most requests waiting for a slot; beyond it submit fails.
        max_length: cache length per slot (prompt bucket plus new tokens).
        memory_budget_bytes: if set, slots are limited to what fits.
        prompt_bucket: prompts are left-padded to a multiple of this.
        default_max_new_tokens: when a request does not say.
        backend: "auto" (the export's LiteRT file when it has one, else its
            XLA functions), "litert" or "saved_model".
        num_threads: LiteRT threads (0: every core).
    """

    max_slots: int = 16
    max_queue: int = 64
    max_length: int = 1024
    memory_budget_bytes: int = 0
    prompt_bucket: int = 64
    default_max_new_tokens: int = 128
    backend: str = "auto"
    num_threads: int = 0


@dataclasses.dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple = ()
    stop_ids: tuple = ()
    ignore_eos: bool = False


class Request:
    """One generation request; the scheduler fills `events`.

    `events` receives `("delta", text, ids)` items and finally
    `("done", summary_dict)`.
    """

    def __init__(self, prompt_ids, sampling):
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.created = time.perf_counter()
        self.started = None
        self.first_token_at = None
        self.tokens = []
        self.text = ""
        self.sent = 0  # characters of `text` already sent as deltas
        self.finished = False  # "done" was sent

    def cancel(self):
        self.cancelled.set()


class _Slot:
    def __init__(self, request, prompt_length, key_start, decoder):
        self.request = request
        self.prompt_length = prompt_length
        self.key_start = key_start
        self.decoder = decoder
        self.last_token = None


class _SavedModelSteps:
    """Prefill/decode through the export's `engine` functions (XLA), the
    KV cache in the SavedModel's variables."""

    name = "saved_model"

    def __init__(self, module):
        self.engine = module.engine

    def limit(self, max_length):
        return max_length

    def slots(self, wanted):
        return wanted

    def allocate(self, num_slots, max_length):
        self.engine.allocate(tf.constant(num_slots), tf.constant(max_length))

    def prefill(self, padded, key_start, slot, s):
        token, _ = self.engine.prefill(
            tf.constant(padded), tf.constant([key_start], tf.int32),
            tf.constant(slot, tf.int32), tf.constant([s.temperature], tf.float32),
            tf.constant([s.top_k], tf.int32), tf.constant([s.top_p], tf.float32),
            tf.constant([s.seed], tf.int32))
        return int(token.numpy()[0])

    def decode(self, tokens, position, key_start, step, temperature, top_k, top_p, seed):
        nxt, _ = self.engine.decode(tokens, position, key_start, step,
                                    temperature, top_k, top_p, seed)
        return nxt.numpy()

    def row_counts(self, num_slots):
        """Every row count a decode step can have: 1, 2, 4, ... slots."""
        rows, counts = 1, []
        while rows < num_slots:
            counts.append(rows)
            rows *= 2
        return counts + [num_slots]


class _LiteRTSteps:
    """Prefill/decode with the export's LiteRT file (`assets.extra/litert/
    model.tflite`, see `keras_llm.litert`): XNNPACK kernels, int8 weights
    when the export asked for them, the KV cache in the interpreter's
    buffers. Greedy rows use the graph's argmax; sampled rows go through
    `keras_llm.samplers.sample_next`, as on the XLA path.

    Each decode signature (batch size, cache length) has its own cache
    buffers. One of them is active and holds every busy row; a step that
    needs more rows or positions, or fits a smaller one, moves to that
    signature and copies the cache over once (no per-step mirroring)."""

    name = "litert"

    def __init__(self, path, num_threads=None):
        from keras_llm.litert import LiteRTRunner  # pylint: disable=import-outside-toplevel
        from keras_llm.samplers import sample_next  # pylint: disable=import-outside-toplevel
        self.runner = LiteRTRunner(path, num_threads=num_threads)
        self._sample = tf.function(sample_next)
        self.active = None

    def limit(self, max_length):
        return min(max_length, self.runner.max_length)

    def slots(self, wanted):
        return min(wanted, self.runner.batch_sizes[-1])

    def allocate(self, num_slots, max_length):
        del num_slots, max_length  # the file's buffers are fixed

    def _activate(self, rows, length):
        """Make the smallest signature with `rows` rows and `length`
        positions active, carrying the busy rows' cache over."""
        chosen = self.runner.decoder(rows, length)
        if chosen is not self.active:
            if self.active is not None:
                self.runner.copy_cache(self.active, chosen, self.active.batch_size,
                                       self.active.length)
            self.active = chosen
        return chosen

    def prefill(self, padded, key_start, slot, s):
        # Never shrink here: the active signature holds the other busy rows.
        rows, length = slot + 1, padded.shape[1] + 1
        if self.active is not None:
            rows = max(rows, self.active.batch_size)
            length = max(length, self.active.length)
        target = self._activate(rows, min(length, self.runner.max_length))
        logits = self.runner.prefill(padded[0, key_start:], [(target, slot)], start=key_start)
        if s.temperature <= 0:
            return int(np.argmax(logits))
        row = lambda value, dtype: np.array([value], dtype)  # noqa: E731
        token = self._sample(logits[np.newaxis], row(s.temperature, np.float32),
                             row(s.top_k, np.int32), row(s.top_p, np.float32),
                             row(s.seed, np.int32), row(0, np.int32))
        return int(token.numpy()[0])

    def decode(self, tokens, position, key_start, step, temperature, top_k, top_p, seed):
        # Rows past len(tokens) are idle and positions past max(position) unused.
        signature = self._activate(len(tokens), int(np.max(position)) + 1)
        greedy = self.runner.step(signature, tokens, position, key_start)
        if not (temperature > 0).any():
            return greedy
        logits = np.array(signature.views["logits"][:len(tokens)])
        return self._sample(logits, temperature, top_k, top_p, seed, step).numpy()

    def row_counts(self, num_slots):
        return [b for b in self.runner.batch_sizes if b <= num_slots] or [num_slots]


class Engine:
    """Loads an export and generates for many concurrent requests.

    Args:
        export_dir: a version directory written by `export`.
        config: an `EngineConfig`.
    """

    def __init__(self, export_dir, config=None):
        self.config = config or EngineConfig()
        self.export_dir = export_dir
        # The signatures answer the server's TF Serving Predict calls.
        self.module = tf.saved_model.load(export_dir)
        assets = os.path.join(export_dir, "assets")
        with open(os.path.join(assets, "keras_llm.json"), encoding="utf-8") as handle:
            self.metadata = json.load(handle)
        self.tokenizer = BytePairTokenizer.load_assets(assets)
        model = self.metadata["config"]
        self.context_length = model["context_length"]
        self.stop_ids = tuple(self.metadata["tokenizer"]["stop_ids"])
        self.pad_id = self.metadata["tokenizer"]["pad_id"]
        c = self.config
        self.steps = self._backend(export_dir, c, self.module)
        self.max_length = self.steps.limit(min(c.max_length, self.context_length))
        itemsize = 2 if self.metadata.get("dtype") in ("bfloat16", "float16") else 4
        self.bytes_per_slot = (2 * model["num_layers"] * model["num_key_value_heads"]
                               * model["head_dim"] * self.max_length * itemsize)
        slots = self.steps.slots(c.max_slots)
        if c.memory_budget_bytes:
            slots = min(slots, c.memory_budget_bytes // self.bytes_per_slot)
            if slots < 1:
                raise ValueError(f"memory budget {c.memory_budget_bytes} B is below one slot "
                                 f"({self.bytes_per_slot} B for {self.max_length} tokens)")
        self.num_slots = int(slots)
        self.steps.allocate(self.num_slots, self.max_length)
        LOG.info(json.dumps({"event": "kv_cache", "backend": self.steps.name,
                             "slots": self.num_slots,
                             "context": self.max_length, "bytes_per_slot": self.bytes_per_slot,
                             "bytes": self.bytes_per_slot * self.num_slots}))
        self._waiting = []
        self._slots = [None] * self.num_slots
        self._lock = threading.Condition()
        self._stopping = False
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="keras-llm-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def _backend(export_dir, config, module):
        path = os.path.join(export_dir, "assets.extra", "litert", "model.tflite")
        if config.backend not in ("auto", "litert", "saved_model"):
            raise ValueError(f"backend must be auto, litert or saved_model, got {config.backend!r}")
        if config.backend == "litert" and not os.path.isfile(path):
            raise ValueError(f"{export_dir} has no LiteRT file (export it with --litert)")
        if config.backend == "saved_model" or not os.path.isfile(path):
            return _SavedModelSteps(module)
        return _LiteRTSteps(path, config.num_threads or None)

    # ----- public interface ------------------------------------------------

    def encode(self, text, chat=False, system=None):
        if chat:
            text = self.tokenizer.apply_chat_template(text, system=system or None)
        return self.tokenizer.encode(text)

    def submit(self, prompt_ids, sampling):
        """Queue a request; raises InvalidRequest or QueueFull at once."""
        if not prompt_ids:
            raise InvalidRequest("empty prompt")
        vocab = self.metadata["config"]["vocabulary_size"]
        if any(not 0 <= int(t) < vocab for t in prompt_ids):
            raise InvalidRequest(f"token ids must be in [0, {vocab})")
        if sampling.max_new_tokens <= 0:
            sampling.max_new_tokens = self.config.default_max_new_tokens
        if sampling.temperature < 0 or not 0 <= sampling.top_p <= 1 or sampling.top_k < 0:
            raise InvalidRequest("temperature must be >= 0, top_p in [0, 1], top_k >= 0")
        bucket = self._bucket(len(prompt_ids))
        if bucket + sampling.max_new_tokens > self.max_length:
            raise InvalidRequest(
                f"prompt of {len(prompt_ids)} tokens (padded to {bucket}) plus "
                f"{sampling.max_new_tokens} new tokens exceeds the per-sequence limit "
                f"of {self.max_length}")
        request = Request(prompt_ids, sampling)
        with self._lock:
            if self._stopping:
                raise EngineStopped("this model version is no longer taking requests")
            free = sum(slot is None for slot in self._slots)
            if len(self._waiting) - free >= self.config.max_queue:
                raise QueueFull(f"queue is full ({self.config.max_queue} waiting)")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def stats(self):
        with self._lock:
            return {"running": sum(s is not None for s in self._slots),
                    "waiting": len(self._waiting)}

    def warmup(self, prompt_buckets=2):
        """Compile before taking traffic: prefill for the first prompt buckets
        and decode for every row count a step can have."""
        greedy = Sampling(max_new_tokens=1)
        for k in range(1, prompt_buckets + 1):
            length = min(k * self.config.prompt_bucket, self.max_length)
            self.steps.prefill(np.full([1, length], self.pad_id, np.int32), 0, 0, greedy)
        for rows in self.steps.row_counts(self.num_slots):
            zeros = np.zeros([rows], np.int32)
            self.steps.decode(zeros, zeros, zeros, zeros, np.zeros([rows], np.float32), zeros,
                              np.ones([rows], np.float32), zeros)
        request = self.submit(self.tokenizer.encode("Hello") or [0], Sampling(max_new_tokens=2))
        while request.events.get()[0] != "done":
            pass
        self.ready.set()

    def stop(self, timeout=None):
        """Stop taking work; wait for running requests, then end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    # ----- scheduler -------------------------------------------------------

    def _bucket(self, length):
        return min(round_up(length, self.config.prompt_bucket), self.max_length)

    def _loop(self):
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._lock.wait()
                if self._stopping and not self._waiting and not any(self._slots):
                    return
                admit = []
                for index, slot in enumerate(self._slots):
                    if slot is None and self._waiting:
                        admit.append((index, self._waiting.pop(0)))
            try:
                for index, request in admit:
                    self._prefill(index, request)
                if any(self._slots):
                    self._step()
            except Exception:  # pylint: disable=broad-except
                LOG.exception("engine step failed")
                for index, slot in enumerate(self._slots):
                    if slot is not None:
                        self._finish(index, "error")
                # A request admitted but not yet in a slot must end too.
                for _, request in admit:
                    if not request.finished:
                        request.finished = True
                        request.events.put(("done", self._summary(request, "error")))

    def _prefill(self, index, request):
        if request.cancelled.is_set():
            request.finished = True
            request.events.put(("done", self._summary(request, "cancelled")))
            return
        request.started = time.perf_counter()
        ids = request.prompt_ids
        bucket = self._bucket(len(ids))
        padded = np.full([1, bucket], self.pad_id, np.int32)
        padded[0, bucket - len(ids):] = ids
        s = request.sampling
        token = self.steps.prefill(padded, bucket - len(ids), index, s)
        slot = _Slot(request, bucket, bucket - len(ids), self.tokenizer.stream_decoder())
        self._slots[index] = slot
        self._emit(index, token)

    def _rows(self):
        """Rows a decode step covers: past the highest busy slot, rounded up to
        a power of two (each size is one compiled program)."""
        highest = max(i for i, slot in enumerate(self._slots) if slot is not None)
        rows = 1
        while rows <= highest:
            rows *= 2
        return min(rows, self.num_slots)

    def _step(self):
        n = self._rows()
        tokens = np.zeros([n], np.int32)
        position = np.zeros([n], np.int32)
        key_start = np.zeros([n], np.int32)
        step = np.zeros([n], np.int32)
        temperature = np.zeros([n], np.float32)
        top_k = np.zeros([n], np.int32)
        top_p = np.ones([n], np.float32)
        seed = np.zeros([n], np.int32)
        for i, slot in enumerate(self._slots[:n]):
            if slot is None:
                continue
            r = slot.request
            tokens[i] = slot.last_token
            position[i] = slot.prompt_length + len(r.tokens) - 1
            key_start[i] = slot.key_start
            step[i] = len(r.tokens)
            s = r.sampling
            temperature[i], top_k[i], top_p[i], seed[i] = s.temperature, s.top_k, s.top_p, s.seed
        nxt = self.steps.decode(tokens, position, key_start, step, temperature, top_k, top_p, seed)
        for i, slot in enumerate(self._slots[:n]):
            if slot is not None:
                self._emit(i, int(nxt[i]))

    def _emit(self, index, token):
        slot = self._slots[index]
        request = slot.request
        s = request.sampling
        if request.cancelled.is_set():
            self._finish(index, "cancelled")
            return
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if (token in s.stop_ids) or (token in self.stop_ids and not s.ignore_eos):
            self._finish(index, "stop")
            return
        request.tokens.append(token)
        slot.last_token = token
        request.text += slot.decoder.push(token)
        if s.stop:
            hits = [request.text.find(x) for x in s.stop if x in request.text]
            if hits:
                request.text = request.text[:min(hits)]
                self._release(request, [token], len(request.text))
                self._finish(index, "stop")
                return
            # Hold back what could still become the start of a stop string.
            longest = max(len(x) for x in s.stop)
            self._release(request, [token], len(request.text) - (longest - 1))
        else:
            self._release(request, [token], len(request.text))
        if len(request.tokens) >= s.max_new_tokens:
            self._finish(index, "length")

    @staticmethod
    def _release(request, token_ids, upto):
        """Send text up to character `upto` that was not sent yet, with `token_ids`."""
        upto = max(upto, request.sent)
        request.events.put(("delta", request.text[request.sent:upto], token_ids))
        request.sent = upto

    def _finish(self, index, reason):
        slot = self._slots[index]
        self._slots[index] = None
        request = slot.request
        if reason != "stop":
            request.text += slot.decoder.flush()
        if len(request.text) > request.sent:
            self._release(request, [], len(request.text))
        request.finished = True
        request.events.put(("done", self._summary(request, reason)))

    def _summary(self, request, reason):
        now = time.perf_counter()
        started = request.started or now
        return {
            "finish_reason": reason,
            "prompt_tokens": len(request.prompt_ids),
            "generated_tokens": len(request.tokens),
            "queue_s": started - request.created,
            "time_to_first_token_s": (request.first_token_at or now) - request.created,
            "total_s": now - request.created,
            "text": request.text,
            "token_ids": list(request.tokens),
        }
