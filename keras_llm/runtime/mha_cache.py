"""The KV-cache backend for a user's causal LM built on MultiHeadAttention.

A causal LM written with tf.keras's own `MultiHeadAttention` called as causal
self-attention (`use_causal_mask=True`), with learned position embeddings
(an `Embedding` looked up at `0..T-1`), runs with a KV cache: while the
backend's step is traced, each of the model's `MultiHeadAttention` layers
(at the top of a Functional model or inside the user's own layers, such as
keras.io's `TransformerBlock`) writes its keys and values into a per-slot
cache and attends over it, and each position `Embedding` looks up every
token's absolute position instead of `0..T-1`. The layers, their weights and
the model itself are the user's; only their `call` is swapped, and only
while the backend traces. A decode step then runs one token per row instead
of the whole sequence.

The cache is used only when a probe shows it computes the model: prompts
prefilled and then fed one token at a time, two rows at different positions
in one step, give the full model's logits at every position
(`MHACacheBackend.from_model` raises ValueError otherwise, and the recompute
backend runs the model).

Example:
    >>> backend = MHACacheBackend.from_model(model)   # ValueError: not such a model
    >>> engine = Engine(backend, tokenizer)
"""

import contextlib
import functools
import math
import types

import numpy as np
import tensorflow as tf

from keras_llm.generation import round_up
from keras_llm.runtime.backend import Backend, Capabilities, row_counts
from keras_llm.runtime.recompute import (call_model, fixed_length, last_logits, max_positions,
                                         last_position_plan, probe_model, tolerance)

_MASKED = -1e9  # what MultiHeadAttention's masked softmax adds


class _Context:
    """What the swapped calls read while a step is traced: the cache
    variables, each row's slot `(B,)`, each token's position `(B, T)`, the
    tensor whose size is how many positions to attend to, and which
    attention layers this trace has called."""

    def __init__(self):
        self.caches = []
        self.rows = None
        self.positions = None
        self.window = None
        self.called = set()


def _refuse_call(mha, query, value, key, kwargs):
    """Why this call of `mha` is not what the cache reproduces (causal
    self-attention, no mask of its own, attention over the time axis), or None."""
    if value is not query or (key is not None and key is not query):
        return "it is not self-attention (query = value = key)"
    if not kwargs.get("use_causal_mask"):
        return "it is not causal (use_causal_mask=True)"
    if kwargs.get("attention_mask") is not None or kwargs.get("return_attention_scores"):
        return "it takes an attention mask or returns its scores"
    if any(getattr(x, "_keras_mask", None) is not None for x in (query, value, key)):
        return "its inputs carry a padding mask (an Embedding with mask_zero=True)"
    if tuple(getattr(mha, "_attention_axes", None) or (1,)) != (1,) or query.shape.rank != 3:
        return "it attends over axes other than time"
    return None


def _admit(mha, index, context, query, value, key, kwargs):
    """Raise ValueError unless this call of `mha` is one the cache
    reproduces (`_refuse_call`) and its first in this trace."""
    why = _refuse_call(mha, query, value, key, kwargs)
    if why:
        raise ValueError(f"{mha.name!r} cannot run with a KV cache: {why}")
    if index in context.called:
        raise ValueError(f"{mha.name!r} is called more than once per forward pass")
    context.called.add(index)


@tf.autograph.experimental.do_not_convert
def _cached_attention(mha, index, context, query, value=None, key=None, **kwargs):
    """`mha(query, value, key, **kwargs)` over the slots' cache: writes this
    call's keys and values at the tokens' positions, attends over every
    position up to each token's own."""
    _admit(mha, index, context, query, value, key, kwargs)
    q = mha._query_dense(query) * (1.0 / math.sqrt(float(mha._key_dim)))  # (B, T, N, H)
    k = mha._key_dense(query)  # (B, T, N, H)
    v = mha._value_dense(query)  # (B, T, N, Hv)
    keys, values = context.caches[index]  # (S, N, L, H), (S, N, L, Hv)
    rows, positions = context.rows, context.positions  # (B,), (B, T)
    batch, length, heads = tf.shape(q)[0], tf.shape(q)[1], tf.shape(q)[2]
    shape = tf.stack([batch, length, heads])
    where = tf.stack([tf.broadcast_to(rows[:, tf.newaxis, tf.newaxis], shape),
                      tf.broadcast_to(tf.range(heads)[tf.newaxis, tf.newaxis, :], shape),
                      tf.broadcast_to(positions[:, :, tf.newaxis], shape)], axis=-1)
    where = tf.reshape(where, [-1, 3])  # (B * T * N, 3): slot, head, position
    keys.scatter_nd_update(where, tf.reshape(tf.cast(k, keys.dtype), [-1, tf.shape(k)[3]]))
    values.scatter_nd_update(where, tf.reshape(tf.cast(v, values.dtype), [-1, tf.shape(v)[3]]))
    window = tf.shape(context.window)[0]  # a constant to XLA: compiled per size
    all_keys = tf.cast(tf.gather(keys[:, :, :window], rows), q.dtype)  # (B, N, W, H)
    all_values = tf.cast(tf.gather(values[:, :, :window], rows), q.dtype)
    scores = tf.matmul(tf.transpose(q, [0, 2, 1, 3]), all_keys, transpose_b=True)  # (B, N, T, W)
    slots = tf.range(tf.shape(all_keys)[2])
    allowed = slots[tf.newaxis, tf.newaxis, :] <= positions[:, :, tf.newaxis]  # (B, T, W)
    scores = tf.where(allowed[:, tf.newaxis], scores, tf.cast(_MASKED, scores.dtype))
    weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
    attended = tf.matmul(tf.cast(weights, q.dtype), all_values)  # (B, N, T, Hv)
    return mha._output_dense(tf.transpose(attended, [0, 2, 1, 3]))  # (B, T, D)


@tf.autograph.experimental.do_not_convert
def _absolute_positions(embedding, context, inputs):  # pylint: disable=unused-argument
    """A position `Embedding` looked up at each token's absolute position."""
    return type(embedding).call(embedding, context.positions)  # (B, T, D)


class _ExternalContext:
    """What the swapped calls read while a LiteRT step is traced: the
    converter's `ExternalCacheContext` (past keys/values as inputs, each
    row's position) and which attention layers this trace has called."""

    def __init__(self, cache):
        self.cache = cache
        self.called = set()


@tf.autograph.experimental.do_not_convert
def _external_attention(mha, index, context, query, value=None, key=None, **kwargs):
    """`mha(query, value, key, **kwargs)` over past keys/values that are the
    step's inputs (`(B, N, S, H)` each, masked by each row's position) and
    this call's own, which become the step's outputs (the runtime writes
    them into its cache)."""
    _admit(mha, index, context, query, value, key, kwargs)
    heads_first = lambda t: tf.transpose(t, [0, 2, 1, 3])  # noqa: E731  (B, T, N, H) -> (B, N, T, H)
    q = heads_first(mha._query_dense(query) * (1.0 / math.sqrt(float(mha._key_dim))))
    k, v = heads_first(mha._key_dense(query)), heads_first(mha._value_dense(query))
    past_keys, past_values = context.cache.past(index, k, v)  # (B, N, S, H)
    past_bias, new_bias = context.cache.attention_biases(tf.shape(q)[2], tf.shape(past_keys)[2])
    # The biases are (B, 1, 1, T or 1, S or T) for grouped heads: drop the group axis.
    scores = tf.concat([tf.einsum("bntd,bnsd->bnts", q, past_keys) + past_bias[:, 0],
                        tf.einsum("bntd,bnsd->bnts", q, k) + new_bias[:, 0]], axis=-1)
    probs = tf.nn.softmax(scores, axis=-1)
    split = tf.shape(past_keys)[2]
    mixed = (tf.einsum("bnts,bnsd->bntd", probs[..., :split], past_values)
             + tf.einsum("bnts,bnsd->bntd", probs[..., split:], v))
    return mha._output_dense(heads_first(mixed))  # (B, T, D)


@tf.autograph.experimental.do_not_convert
def _external_positions(embedding, context, inputs):
    """A position `Embedding` at each token's absolute position (a padded
    prefill's positions past the table read its last row: their outputs
    are never used)."""
    positions = context.cache.positions(tf.shape(inputs)[-1])  # (B, T); inputs: 0..T-1
    return type(embedding).call(embedding, tf.minimum(positions, embedding.input_dim - 1))


def convert_litert(model, path, max_length, batch_sizes=(1, 4, 16), prefill_length=64,
                   lengths=(), verify_length=0):
    """Convert a `MultiHeadAttention` causal LM to a LiteRT file that
    `runtime.litert.LiteRTBackend` runs with its KV cache (the layout of
    `keras_llm.litert.convert`'s files: caches `(B, heads, positions, key
    size)` per layer as inputs, the step's keys/values as outputs).

    Raises:
        ValueError: the model's attention layers differ in heads or sizes,
            or a value size differs from the key size (one cache shape), or
            a refusal of `_refuse_call`.
    """
    from keras_llm import litert  # pylint: disable=import-outside-toplevel
    attention = attention_layers(model)
    shapes = {(layer._key_dense.kernel.shape[1], layer._key_dense.kernel.shape[2],
               layer._value_dense.kernel.shape[2]) for layer in attention}
    if len(shapes) != 1 or len({*next(iter(shapes))[1:]}) != 1:
        raise ValueError(f"its attention layers' (heads, key size, value size) are {shapes}; "
                         "LiteRT's cache takes one shape with equal key and value sizes")
    heads, size, _ = next(iter(shapes))
    output_shape = getattr(model, "output_shape", None)
    vocabulary = output_shape[-1] if isinstance(output_shape, tuple) else None
    positions = position_embeddings(model, vocabulary)
    any_length = fixed_length(model) is not None

    def forward(tokens, cache):
        context = _ExternalContext(cache)
        with _swapped_calls(attention, positions, context, _external_attention,
                            _external_positions):
            return call_model(model, tokens, any_length)

    config = types.SimpleNamespace(num_layers=len(attention), num_key_value_heads=int(heads),
                                   head_dim=int(size))
    return litert.convert_cached(model, path, config, forward, max_length, batch_sizes,
                                 prefill_length, lengths, verify_length)


def attention_layers(model):
    """The model's `MultiHeadAttention` layers (its own or inside its layers),
    in order.

    Raises:
        ValueError: it has none.
    """
    seen, attention = set(), []
    for layer in [model, *model.submodules]:
        if isinstance(layer, tf.keras.layers.MultiHeadAttention) and id(layer) not in seen:
            seen.add(id(layer))
            attention.append(layer)
    if not attention:
        raise ValueError("it has no MultiHeadAttention layers")
    return attention


def position_embeddings(model, vocabulary_size):
    """The `Embedding` layers that look up positions, not tokens: in a
    Functional model, those its input ids do not feed; inside the user's own
    layers, those whose size differs from the vocabulary's."""
    ids = model.inputs[0] if getattr(model, "inputs", None) else None
    found = []
    for layer in model.submodules:
        if not isinstance(layer, tf.keras.layers.Embedding) or layer in found:
            continue
        nodes = layer.inbound_nodes if layer in getattr(model, "layers", ()) else []
        if nodes and ids is not None:
            if all(node.input_tensors is not ids for node in nodes):
                found.append(layer)
        elif layer.input_dim != vocabulary_size:
            found.append(layer)
    return found


@contextlib.contextmanager
def _swapped_calls(attention, positions, context, attend=_cached_attention,
                   look_up=_absolute_positions):
    """Within: `attention`'s calls run over the cache (`attend`) and
    `positions`' look up absolute positions (`look_up`) (instance
    attributes over the class's `call`)."""
    for index, layer in enumerate(attention):
        object.__setattr__(layer, "call", functools.partial(attend, layer, index, context))
    for layer in positions:
        object.__setattr__(layer, "call", functools.partial(look_up, layer, context))
    try:
        yield
    finally:
        for layer in (*attention, *positions):
            object.__delattr__(layer, "call")


class MHACacheBackend(Backend):
    """The engine's backend for a `MultiHeadAttention` causal LM, with a KV
    cache (see the module docstring).

    Args:
        model: the user's causal LM.
        vocabulary_size: logits per row.
        max_length: most positions per sequence (its position embedding's size).
        max_slots: most sequences one step runs.
        length_bucket: prompts are right-padded to a multiple of this.
        jit_compile: compile the steps with XLA.
    """

    def __init__(self, model, vocabulary_size, max_length, max_slots=16, length_bucket=32,
                 jit_compile=True):
        self.model = model
        self.attention = attention_layers(model)
        self.positions = position_embeddings(model, vocabulary_size)
        # prefill: the layers after the last attention on the last position only
        self.plan = last_position_plan(model, attention=False)
        self.context = _Context()
        self.any_length = fixed_length(model) is not None  # steps run 1 token: past the check
        self.length_bucket, self.jit_compile = int(length_bucket), bool(jit_compile)
        self.capabilities = Capabilities("mha-cache", int(max_slots), int(max_length),
                                         int(vocabulary_size),
                                         str(getattr(model, "compute_dtype", "float32")))
        self.allocate(2, max_length)  # two: what `check` runs

    @classmethod
    def from_model(cls, model, max_length=None, check=True, **options):
        """The backend, after the causality probe and (with `check`) the
        cache probe (`check`, which a caller running the model elsewhere,
        such as on LiteRT, does there instead).

        Raises:
            ValueError: not a model this backend runs, or one whose cached
                steps do not give its own logits.
        """
        attention_layers(model)  # the structural check first, before any probe
        output_shape = getattr(model, "output_shape", None)
        vocabulary = output_shape[-1] if isinstance(output_shape, tuple) else None
        limit = max_positions(model, vocabulary)
        if limit is None:
            raise ValueError("its longest sequence is unknown (no position embedding)")
        if max_length is not None:
            limit = min(limit, int(max_length))
        vocabulary = probe_model(model, fixed_length(model) or min(8, limit), vocabulary)
        backend = cls(model, vocabulary, limit, **options)
        if check:
            backend.check(min(24, limit))
        return backend

    def allocate(self, num_slots, max_length):
        num_slots = max(1, min(int(num_slots), self.capabilities.max_slots))
        max_length = min(int(max_length), self.capabilities.max_length)
        self.num_slots, self.max_length = num_slots, max_length
        dtype = self.model.compute_dtype
        # (S + 1, N, L, H) each: slot S is the padding rows' scratch
        self.context.caches = [
            tuple(tf.Variable(tf.zeros([num_slots + 1, dense.kernel.shape[1], max_length,
                                        dense.kernel.shape[2]], dtype), trainable=False)
                  for dense in (layer._key_dense, layer._value_dense))
            for layer in self.attention]
        self._lengths = np.zeros([num_slots], np.int32)
        self._windows = {}
        self.capabilities.row_counts = row_counts(num_slots)
        # the concrete function: called without tf.function's dispatch (0.2 ms a step)
        self._run = tf.function(self._logits, jit_compile=self.jit_compile).get_concrete_function(
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None], tf.int32, name="rows"),
            tf.TensorSpec([None, None], tf.int32, name="positions"),
            tf.TensorSpec([None], tf.int32, name="last"),
            tf.TensorSpec([None], tf.int8, name="window"))
        return num_slots, max_length

    def _logits(self, token_ids, rows, positions, last, window):
        """Run `token_ids (B, T)` at `positions (B, T)` into slots `rows`,
        attending to the first `size(window)` cache positions;
        `(greedy (B,), float32 logits (B, V))` at index `last` of each row."""
        self.context.rows, self.context.positions = rows, positions
        self.context.window = window
        self.context.called = set()
        try:
            with _swapped_calls(self.attention, self.positions, self.context):
                return last_logits(self.model, self.plan, token_ids, last, self.any_length)
        finally:
            self.context.rows = self.context.positions = self.context.window = None

    def prefill(self, token_ids, slot, reserve=0):
        ids = np.asarray(token_ids, np.int32).reshape(-1)
        if len(ids) + reserve > self.max_length:
            raise ValueError(f"prompt of {len(ids)} tokens plus {reserve} new tokens exceeds the "
                             f"model's limit of {self.max_length} positions")
        width = min(round_up(len(ids), self.length_bucket), self.max_length)
        padded = np.zeros([1, width], np.int32)  # right padding: written past the prompt,
        padded[0, :len(ids)] = ids               # overwritten before any step attends to it
        _, logits = self._run(tf.constant(padded), tf.constant([slot], tf.int32),
                              tf.constant(np.arange(width, dtype=np.int32)[np.newaxis]),
                              tf.constant([len(ids) - 1], tf.int32), self._window(width))
        self._lengths[slot] = len(ids)
        return logits.numpy()[0]

    def step(self, tokens, rows, need_logits=True):
        rows = np.asarray(rows, np.int32)
        n = len(rows)
        if np.any(self._lengths[rows] >= self.max_length):
            raise ValueError(f"a sequence reached the model's limit of {self.max_length} positions")
        count = next(c for c in self.capabilities.row_counts if c >= n)  # compiled batch sizes
        padded_rows = np.full([count], self.num_slots, np.int32)  # padding: the scratch slot
        padded_rows[:n] = rows
        ids = np.zeros([count, 1], np.int32)
        ids[:n, 0] = np.asarray(tokens, np.int32).reshape(-1)
        positions = np.zeros([count, 1], np.int32)
        positions[:n, 0] = self._lengths[rows]
        greedy, logits = self._run(tf.constant(ids), tf.constant(padded_rows),
                                   tf.constant(positions), tf.constant(np.zeros(count, np.int32)),
                                   self._window(int(positions.max()) + 1))
        self._lengths[rows] += 1
        return greedy.numpy()[:n], (logits.numpy()[:n] if need_logits else None)

    def _window(self, length):
        """The tensor whose size is how many cache positions a call over
        `length` positions attends to: the next power of two from 64 (a
        compilation per size). The builtin-layers GPT of `benchmarks/
        user_model` (hidden 256, 512 positions), 40 positions in: a step in
        2.18 ms against 2.91 ms over the whole cache."""
        size = min(max(64, 1 << max(length - 1, 0).bit_length()), self.max_length)
        if size not in self._windows:
            self._windows[size] = tf.zeros([size], tf.int8)
        return self._windows[size]

    def check(self, length, seed=0):
        """Raise ValueError unless this backend's cached steps give the
        model's own logits (see `check_cache`)."""
        check_cache(self, self.model, length, self.any_length, seed)
        self._lengths[:] = 0


def check_cache(backend, model, length, any_length=False, seed=0):
    """Raise ValueError unless `backend` (this module's, or a LiteRT one
    over the converted model) gives `model`'s own logits: prompts of random
    ids (half of `length`, and one token less in a second slot when there
    are two) followed by single steps, both rows in one step. The slots'
    contents are left to the caller to free."""
    ids = np.random.default_rng(seed).integers(
        0, backend.capabilities.vocabulary_size, size=length).astype(np.int32)
    full = np.asarray(tf.cast(call_model(model, tf.constant(ids[np.newaxis]), any_length),
                              tf.float32))[0]  # (T, V)
    cut = max(length // 2, 2)
    slots = list(range(min(2, getattr(backend, "num_slots", 2))))
    got = [[backend.prefill(ids[:cut - slot], slot)] for slot in slots]
    for position in range(cut, length):
        _, logits = backend.step([ids[position - slot] for slot in slots], slots)
        for slot in slots:
            got[slot].append(logits[slot])
    difference = max(float(np.max(np.abs(np.stack(got[slot]) - full[cut - 1 - slot:
                                                                     length - slot])))
                     for slot in slots)
    if difference > tolerance(model, full):
        raise ValueError(f"its cached steps differ from its own logits by up to "
                         f"{difference:.3g} (a layer mixes positions in a way the cache "
                         "does not reproduce)")
