"""XLA-compiled generation over a fixed-size KV cache.

Two compiled functions do all the work: `prefill` runs the prompt through the
model, fills the cache and samples the first token; `decode` runs a
`tf.while_loop` of single-token steps. Prompts are left-padded to a multiple
of `prompt_bucket` and the cache sized to a multiple of `cache_bucket`, so the
number of compilations is small and known: one `prefill` per
(batch, prompt bucket, cache size) and one `decode` per (batch, cache size,
chunk capacity). Sampling parameters, the number of new tokens and stop ids
are tensors: changing them never retraces.
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from keras_llm.layers import KVCacheContext
from keras_llm.models import config_from_model, find_layer
from keras_llm.runtime.params import SamplingParams  # noqa: F401  (the one type, re-exported)
from keras_llm.samplers import sample_next


@dataclasses.dataclass
class Generation:
    """The result for one prompt.

    Attributes:
        token_ids: generated ids, without the stop token.
        finish_reason: "stop" (a stop id came) or "length".
        prompt_length: number of prompt tokens.
    """

    token_ids: list
    finish_reason: str
    prompt_length: int


def round_up(value, multiple):
    """`value` rounded up to a multiple of `multiple` (ints or int tensors)."""
    return (value + multiple - 1) // multiple * multiple


def account(token, done, lengths, finished, stop_ids, max_new_tokens, step, pad_id):
    """Stop and length handling of an in-graph decode loop, after `step`.

    Pads rows already done (or `finished`), counts each row's tokens (a stop
    id is not counted) and marks rows done at a stop id or `max_new_tokens`.
    Shared by every SavedModel decode loop.

    Args:
        token: int32 `(B,)` sampled tokens; done, finished: bool `(B,)`;
        lengths: int32 `(B,)` tokens so far; stop_ids: int32 `(S,)`;
        max_new_tokens: int32 `(B,)`; step: the step index; pad_id: int.

    Returns:
        `(token, done, lengths)`.
    """
    done = done | finished
    token = tf.where(done, pad_id, token)
    stopped = tf.reduce_any(token[:, tf.newaxis] == stop_ids[tf.newaxis, :], axis=-1) & ~done
    lengths += tf.cast(~(done | stopped), tf.int32)
    done = done | stopped | (step + 1 >= max_new_tokens)
    return token, done, lengths


class Generator:
    """Generates tokens from a keras-llm model with a KV cache and XLA.

    Args:
        model: a Functional model from `build_llama` (or a TF-MOT clone of it).
        pad_id: id written into left padding and after a row stopped.
        prompt_bucket: prompts are padded to a multiple of this many tokens.
        cache_bucket: the cache holds a multiple of this many slots.
        jit_compile: compile with XLA (set False to debug).
        stream_chunk: most tokens one streaming `decode` call produces.

    Example:
        >>> gen = Generator(model)
        >>> [result] = gen.generate([[504, 3575, 282]], SamplingParams(max_new_tokens=8))
    """

    def __init__(self, model, pad_id=0, prompt_bucket=64, cache_bucket=256,
                 jit_compile=True, stream_chunk=16):
        self.model = model
        self.config = config_from_model(model)
        self.pad_id = int(pad_id)
        self.prompt_bucket = int(prompt_bucket)
        self.cache_bucket = int(cache_bucket)
        self.stream_chunk = int(stream_chunk)
        self.cache_dtype = tf.as_dtype(find_layer(model, "layer_0_key").compute_dtype)
        self.prefill_fn = tf.function(self._prefill, jit_compile=jit_compile)
        self.decode_fn = tf.function(self._decode, jit_compile=jit_compile)
        self._compiled = set()

    # ----- compiled pieces -------------------------------------------------

    def _forward(self, token_ids, caches, index, key_start):
        context = KVCacheContext(caches, index, key_start, last_position_only=True)
        with context.active():
            logits = self.model(token_ids, training=False)  # (B, 1, V)
        return tf.cast(logits[:, -1, :], tf.float32), context.caches

    def _prefill(self, prompt_ids, key_start, cache_slots, temperature, top_k,
                 top_p, seeds, stop_ids, max_new_tokens):
        """Fill the cache with `prompt_ids (B, P)` and sample token 0.

        `cache_slots` only carries the cache length in its static shape `(S,)`,
        so that one compiled program serves every call of that shape.
        Returns (token (B,), caches, done (B,), lengths (B,)).
        """
        c = self.config
        batch = tf.shape(prompt_ids)[0]
        caches = KVCacheContext.allocate(batch, c.num_layers, c.num_key_value_heads,
                                         tf.shape(cache_slots)[0], c.head_dim, self.cache_dtype)
        logits, caches = self._forward(prompt_ids, caches, 0, key_start)
        token = sample_next(logits, temperature, top_k, top_p, seeds, 0)
        none = max_new_tokens <= 0
        done = tf.zeros_like(none)
        token, done, lengths = self._account(token, done, tf.zeros_like(key_start), none,
                                             stop_ids, max_new_tokens, 0)
        return token, caches, done, lengths

    def _account(self, token, done, lengths, finished, stop_ids, max_new_tokens, step):
        return account(token, done, lengths, finished, stop_ids, max_new_tokens, step,
                       self.pad_id)

    def _decode(self, token, caches, done, lengths, first_step, num_steps,
                prompt_length, key_start, out_slots, temperature, top_k, top_p, seeds,
                stop_ids, max_new_tokens):
        """Generate up to `num_steps` tokens after `token` (step `first_step - 1`).

        `out_slots` carries the output capacity C in its static shape `(C,)`.
        Returns (tokens (B, C), steps run, last token, caches, done, lengths).
        """
        batch = tf.shape(token)[0]
        capacity = tf.shape(out_slots)[0]
        out = tf.fill([batch, capacity], tf.constant(self.pad_id, tf.int32))
        zero = tf.zeros([], tf.int32)

        def cond(i, token, caches, done, lengths, out):
            return (i < num_steps) & (i < capacity) & ~tf.reduce_all(done)

        def body(i, token, caches, done, lengths, out):
            step = first_step + i
            logits, caches = self._forward(token[:, tf.newaxis], caches,
                                           prompt_length + step - 1, key_start)
            token = sample_next(logits, temperature, top_k, top_p, seeds, step)
            token, done, lengths = self._account(token, done, lengths, tf.zeros_like(done),
                                                 stop_ids, max_new_tokens, step)
            out = xla.dynamic_update_slice(out, token[:, tf.newaxis], tf.stack([zero, i]))
            return i + 1, token, caches, done, lengths, out

        steps, token, caches, done, lengths, out = tf.while_loop(
            cond, body, (zero, token, caches, done, lengths, out))
        return out, steps, token, caches, done, lengths

    # ----- host side -------------------------------------------------------

    def _plan(self, prompts, params):
        c = self.config
        if not prompts:
            raise ValueError("no prompts given")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("empty prompt: give at least one token")
        for p in prompts:
            bad = [t for t in p if not 0 <= int(t) < c.vocabulary_size]
            if bad:
                raise ValueError(f"token ids out of range [0, {c.vocabulary_size}): {bad[:5]}")
        longest = max(lengths)
        if longest + params.max_new_tokens > c.context_length:
            raise ValueError(
                f"prompt of {longest} tokens plus {params.max_new_tokens} new tokens "
                f"exceeds the context length of {c.context_length}")
        prompt_length = min(round_up(longest, self.prompt_bucket), c.context_length)
        cache_length = min(round_up(prompt_length + max(params.max_new_tokens, 1),
                                     self.cache_bucket), c.context_length)
        if cache_length < prompt_length + params.max_new_tokens:
            # Bucket rounding hit the context: use the exact prompt length.
            prompt_length = longest
            cache_length = c.context_length
        ids = np.full([len(prompts), prompt_length], self.pad_id, np.int32)
        for row, p in enumerate(prompts):
            ids[row, prompt_length - len(p):] = p
        key_start = np.array([prompt_length - n for n in lengths], np.int32)
        return ids, key_start, prompt_length, cache_length

    def _tensors(self, params, batch):
        return dict(
            temperature=tf.fill([batch], tf.constant(params.temperature, tf.float32)),
            top_k=tf.fill([batch], tf.constant(params.top_k, tf.int32)),
            top_p=tf.fill([batch], tf.constant(params.top_p, tf.float32)),
            seeds=tf.fill([batch], tf.constant(params.seed, tf.int32)),
            stop_ids=tf.constant(list(params.stop_ids) or [-1], tf.int32),
            max_new_tokens=tf.fill([batch], tf.constant(params.max_new_tokens, tf.int32)),
        )

    def stream(self, prompts, params, stats=None):
        """Generate for a batch of prompts, yielding tokens as they come.

        Args:
            prompts: list of lists of token ids (any lengths).
            params: a `SamplingParams`.

        Yields:
            int32 arrays `(B, n)` of new tokens (pad after a row stopped),
            first one token right after the prefill, then chunks of at most
            `stream_chunk`. Call `generate` for finished results.
        """
        yield from self._run(prompts, params, self.stream_chunk, stats)

    def _run(self, prompts, params, chunk, stats):
        params.validate()
        ids, key_start, prompt_length, cache_length = self._plan(prompts, params)
        batch = len(prompts)
        sampling = self._tensors(params, batch)
        if params.max_new_tokens == 0:
            return
        capacity = chunk or (cache_length - prompt_length)
        compile_s = self._compile(batch, prompt_length, cache_length, capacity, sampling)
        if stats is not None:
            stats["compile_s"] = compile_s
        start = time.perf_counter()
        token, caches, done, lengths = self.prefill_fn(
            tf.constant(ids), tf.constant(key_start), _slots(cache_length), **sampling)
        first = token.numpy()[:, np.newaxis]
        if stats is not None:
            stats["time_to_first_token_s"] = time.perf_counter() - start
        yield first
        decode_start = time.perf_counter()
        produced, step = 1, 1
        while step < params.max_new_tokens and not bool(tf.reduce_all(done)):
            num_steps = min(capacity, params.max_new_tokens - step)
            out, steps, token, caches, done, lengths = self.decode_fn(
                token, caches, done, lengths, tf.constant(step), tf.constant(num_steps),
                tf.constant(prompt_length), tf.constant(key_start), _slots(capacity),
                **sampling)
            steps = int(steps)
            step += steps
            produced += steps
            yield out.numpy()[:, :steps]
        if stats is not None:
            stats["decode_s"] = time.perf_counter() - decode_start
            stats["decode_steps"] = produced - 1
            stats["prompt_bucket"] = prompt_length
            stats["cache_length"] = cache_length

    def _compile(self, batch, prompt_length, cache_length, capacity, sampling):
        """Compile prefill and decode for these shapes ahead of timing them.

        XLA compiles on the first call; running both functions once on dummy
        ids keeps compilation out of time-to-first-token and decode figures.
        Returns the seconds spent (0 when already compiled).
        """
        key = (batch, prompt_length, cache_length, capacity)
        if key in self._compiled:
            return 0.0
        start = time.perf_counter()
        ids = tf.fill([batch, prompt_length], tf.constant(self.pad_id, tf.int32))
        key_start = tf.zeros([batch], tf.int32)
        token, caches, done, lengths = self.prefill_fn(ids, key_start, _slots(cache_length),
                                                       **sampling)
        out, *_ = self.decode_fn(token, caches, done, lengths, tf.constant(1), tf.constant(1),
                                 tf.constant(prompt_length), key_start, _slots(capacity),
                                 **sampling)
        out.numpy()
        self._compiled.add(key)
        return time.perf_counter() - start

    def generate(self, prompts, params, stats=None):
        """Generate for a batch of prompts.

        Args:
            prompts: list of lists of token ids.
            params: a `SamplingParams`.
            stats: optional dict that receives timings.

        Returns:
            A list of `Generation`, one per prompt.
        """
        chunks = list(self._run(prompts, params, 0, stats))
        tokens = (np.concatenate(chunks, axis=1) if chunks
                  else np.zeros([len(prompts), 0], np.int32))
        return _collect(tokens, prompts, params)


def _slots(length):
    """A tensor whose only purpose is its static shape `(length,)`."""
    return tf.zeros([length], tf.int8)


def _collect(tokens, prompts, params):
    stops = set(int(s) for s in params.stop_ids)
    results = []
    for row, prompt in enumerate(prompts):
        ids, reason = [], "length"
        for t in tokens[row, :params.max_new_tokens].tolist():
            if t in stops:
                reason = "stop"
                break
            ids.append(t)
        results.append(Generation(ids, reason, len(prompt)))
    return results
