"""The KV-cache backend for a user's Functional model built on MultiHeadAttention.

A causal LM written with tf.keras's own layers (an `Embedding` for tokens and
one for positions, `MultiHeadAttention` called on itself with
`use_causal_mask=True`, `Dense`, `LayerNormalization`, ...) is cloned
(`tf.keras.models.clone_model`, every layer shared, so no weight is copied)
with two substitutions: each `MultiHeadAttention` writes its keys and values
into a per-slot cache and attends over it, and the position `Embedding` looks
up each token's absolute position instead of `0..T-1`. A decode step then
runs one token per row instead of the whole sequence.

The clone is used only when a probe shows it computes the model: a prompt
prefilled and then fed one token at a time gives the full model's logits at
every position (`MHACacheBackend.from_model` raises ValueError otherwise, and
the recompute backend runs the model). Attention inside the user's own
layers (keras.io's `TransformerBlock`) cannot be reached this way: such
models recompute.

Example:
    >>> backend = MHACacheBackend.from_model(model)   # ValueError: not such a model
    >>> engine = Engine(backend, tokenizer)
"""

import math

import numpy as np
import tensorflow as tf

from keras_llm.runtime.backend import Backend, Capabilities, row_counts
from keras_llm.runtime.recompute import max_positions, probe_model

_MASKED = -1e9  # what MultiHeadAttention's masked softmax adds


class _Context:
    """What the cached layers read while a step is traced: the cache
    variables, each row's slot `(B,)` and each token's position `(B, T)`."""

    def __init__(self):
        self.caches = []
        self.rows = None
        self.positions = None


class _CachedAttention(tf.keras.layers.Layer):
    """A `MultiHeadAttention` (its own sublayers and weights) over the cache."""

    def __init__(self, attention, index, context, **kwargs):
        super().__init__(name=f"{attention.name}_cached", **kwargs)
        self.attention, self.index, self.context = attention, index, context

    def call(self, query, value=None, key=None, **kwargs):  # pylint: disable=arguments-differ
        if self.context.rows is None:  # the clone being built: shapes only
            return self.attention(query, value, key=key, **kwargs)
        mha = self.attention
        q = mha._query_dense(query) * (1.0 / math.sqrt(float(mha._key_dim)))  # (B, T, N, H)
        k = mha._key_dense(query)  # (B, T, N, H)
        v = mha._value_dense(query)  # (B, T, N, Hv)
        keys, values = self.context.caches[self.index]  # (S, L, N, H), (S, L, N, Hv)
        rows, positions = self.context.rows, self.context.positions
        batch, length = tf.shape(q)[0], tf.shape(q)[1]
        where = tf.stack([tf.repeat(rows, length), tf.reshape(positions, [-1])], axis=1)
        keys.scatter_nd_update(where, tf.reshape(tf.cast(k, keys.dtype),
                                                 tf.concat([[-1], tf.shape(k)[2:]], 0)))
        values.scatter_nd_update(where, tf.reshape(tf.cast(v, values.dtype),
                                                   tf.concat([[-1], tf.shape(v)[2:]], 0)))
        all_keys = tf.cast(tf.gather(keys, rows), q.dtype)  # (B, L, N, H)
        all_values = tf.cast(tf.gather(values, rows), q.dtype)
        scores = tf.einsum("btnh,blnh->bntl", q, all_keys)  # (B, N, T, L)
        slots = tf.range(tf.shape(all_keys)[1])
        allowed = slots[tf.newaxis, tf.newaxis, :] <= positions[:, :, tf.newaxis]  # (B, T, L)
        scores = tf.where(allowed[:, tf.newaxis], scores, tf.cast(_MASKED, scores.dtype))
        weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
        context = tf.einsum("bntl,blnh->btnh", tf.cast(weights, q.dtype), all_values)
        return mha._output_dense(context)  # (B, T, D)


class _AbsolutePositions(tf.keras.layers.Layer):
    """A position `Embedding` looked up at each token's absolute position."""

    def __init__(self, embedding, context, **kwargs):
        super().__init__(name=f"{embedding.name}_absolute", **kwargs)
        self.embedding, self.context = embedding, context

    def call(self, inputs):  # pylint: disable=arguments-differ
        if self.context.positions is None:
            return self.embedding(inputs)
        return self.embedding(self.context.positions)  # (B, T, D)


def _self_attention_calls(layer):
    """Whether every call of a `MultiHeadAttention` is causal self-attention
    without a mask of its own (what the cache reproduces)."""
    for node in layer.inbound_nodes:
        args, kwargs = list(node.call_args), dict(node.call_kwargs)
        query = args[0] if args else kwargs.get("query")
        value = args[1] if len(args) > 1 else kwargs.get("value")
        key = args[2] if len(args) > 2 else kwargs.get("key")
        if (value is not query or (key is not None and key is not query)
                or not kwargs.get("use_causal_mask") or kwargs.get("attention_mask") is not None
                or kwargs.get("return_attention_scores")):
            return False
    return True


def attention_layers(model):
    """The model's `MultiHeadAttention` layers, in order, once checked.

    Raises:
        ValueError: the model is not Functional, has no `MultiHeadAttention`
            of its own, calls one other than as causal self-attention, or
            hides one inside another layer.
    """
    if not getattr(model, "_is_graph_network", False):
        raise ValueError("not a Functional model")
    attention = [layer for layer in model.layers
                 if isinstance(layer, tf.keras.layers.MultiHeadAttention)]
    nested = [layer for layer in model.submodules
              if isinstance(layer, tf.keras.layers.MultiHeadAttention) and layer not in attention]
    if not attention or nested:
        raise ValueError("its attention is not MultiHeadAttention layers of the model itself")
    if not all(_self_attention_calls(layer) for layer in attention):
        raise ValueError("a MultiHeadAttention is not called as causal self-attention "
                         "(use_causal_mask=True, query = value = key, no mask)")
    return attention


def cached_clone(model):
    """`(clone, context)`: `model` with cached attention and absolute
    positions (see the module docstring; ValueError as `attention_layers`)."""
    attention = attention_layers(model)
    ids = model.inputs[0]
    context = _Context()
    order = {id(layer): i for i, layer in enumerate(attention)}

    def substitute(layer):
        if id(layer) in order:
            return _CachedAttention(layer, order[id(layer)], context)
        if (isinstance(layer, tf.keras.layers.Embedding)
                and all(node.input_tensors is not ids for node in layer.inbound_nodes)):
            return _AbsolutePositions(layer, context)
        return layer  # shared: the same weights

    clone = tf.keras.models.clone_model(model, clone_function=substitute)
    return clone, context


class MHACacheBackend(Backend):
    """The engine's backend for a Functional `MultiHeadAttention` LM, with a
    KV cache (see the module docstring).

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
        self.clone, self.context = cached_clone(model)
        self.length_bucket, self.jit_compile = int(length_bucket), bool(jit_compile)
        self.capabilities = Capabilities("mha-cache", int(max_slots), int(max_length),
                                         int(vocabulary_size),
                                         str(getattr(model, "compute_dtype", "float32")))
        self.allocate(1, max_length)

    @classmethod
    def from_model(cls, model, max_length=None, **options):
        """The backend, after the causality probe and the cache probe.

        Raises:
            ValueError: not a model this backend runs, or one whose cached
                steps do not give its own logits.
        """
        attention_layers(model)  # the structural checks first, before any probe
        output_shape = getattr(model, "output_shape", None)
        vocabulary = output_shape[-1] if isinstance(output_shape, tuple) else None
        limit = max_positions(model, vocabulary)
        if limit is None:
            raise ValueError("its longest sequence is unknown (no position embedding)")
        if max_length is not None:
            limit = min(limit, int(max_length))
        vocabulary = probe_model(model, min(8, limit), vocabulary)
        backend = cls(model, vocabulary, limit, **options)
        backend.check(min(24, limit))
        return backend

    def allocate(self, num_slots, max_length):
        num_slots = max(1, min(int(num_slots), self.capabilities.max_slots))
        max_length = min(int(max_length), self.capabilities.max_length)
        self.num_slots, self.max_length = num_slots, max_length
        dtype = self.model.compute_dtype
        self.context.caches = [
            (tf.Variable(tf.zeros([num_slots, max_length, *layer._key_dense.kernel.shape[1:]],
                                  dtype), trainable=False),
             tf.Variable(tf.zeros([num_slots, max_length, *layer._value_dense.kernel.shape[1:]],
                                  dtype), trainable=False))
            for layer in self.attention]  # (S, L, N, H) each
        self._lengths = np.zeros([num_slots], np.int32)
        self.capabilities.row_counts = row_counts(num_slots)
        self._run = tf.function(self._logits, jit_compile=self.jit_compile, input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None], tf.int32, name="rows"),
            tf.TensorSpec([None, None], tf.int32, name="positions"),
            tf.TensorSpec([None], tf.int32, name="last")])
        return num_slots, max_length

    def _logits(self, token_ids, rows, positions, last):
        """Run `token_ids (B, T)` at `positions (B, T)` into slots `rows`;
        `(greedy (B,), float32 logits (B, V))` at index `last` of each row."""
        self.context.rows, self.context.positions = rows, positions
        try:
            logits = self.clone(token_ids, training=False)  # (B, T, V)
        finally:
            self.context.rows = self.context.positions = None
        logits = tf.cast(tf.gather(logits, last, batch_dims=1), tf.float32)  # (B, V)
        return tf.argmax(logits, axis=-1, output_type=tf.int32), logits

    def prefill(self, token_ids, slot, reserve=0):
        ids = np.asarray(token_ids, np.int32).reshape(-1)
        if len(ids) + reserve > self.max_length:
            raise ValueError(f"prompt of {len(ids)} tokens plus {reserve} new tokens exceeds the "
                             f"model's limit of {self.max_length} positions")
        width = min(-(-len(ids) // self.length_bucket) * self.length_bucket, self.max_length)
        padded = np.zeros([1, width], np.int32)  # right padding: written past the prompt,
        padded[0, :len(ids)] = ids               # overwritten before any step attends to it
        _, logits = self._run(tf.constant(padded), tf.constant([slot], tf.int32),
                              tf.constant(np.arange(width, dtype=np.int32)[np.newaxis]),
                              tf.constant([len(ids) - 1], tf.int32))
        self._lengths[slot] = len(ids)
        return logits.numpy()[0]

    def step(self, tokens, rows, need_logits=True):
        rows = np.asarray(rows, np.int32)
        positions = self._lengths[rows]
        if np.any(positions >= self.max_length):
            raise ValueError(f"a sequence reached the model's limit of {self.max_length} positions")
        greedy, logits = self._run(
            tf.constant(np.asarray(tokens, np.int32).reshape(-1, 1)), tf.constant(rows),
            tf.constant(positions.reshape(-1, 1)), tf.constant(np.zeros(len(rows), np.int32)))
        self._lengths[rows] += 1
        return greedy.numpy(), (logits.numpy() if need_logits else None)

    def check(self, length, seed=0):
        """Raise ValueError unless a prefill of half of `length` random ids
        and single steps through the rest give the model's own logits."""
        ids = np.random.default_rng(seed).integers(
            0, self.capabilities.vocabulary_size, size=length).astype(np.int32)
        full = np.asarray(tf.cast(self.model(tf.constant(ids[np.newaxis]), training=False),
                                  tf.float32))[0]  # (T, V)
        cut = max(length // 2, 1)
        got = [self.prefill(ids[:cut], 0)]
        for token in ids[cut:]:
            got.append(self.step([token], [0])[1][0])
        self._lengths[0] = 0
        difference = float(np.max(np.abs(np.stack(got) - full[cut - 1:])))
        scale = max(1.0, float(np.max(np.abs(full))))
        if difference > (1e-2 if self.capabilities.dtype in ("float16", "bfloat16")
                         else 1e-4) * scale:
            raise ValueError(f"its cached steps differ from its own logits by up to "
                             f"{difference:.3g} (a layer mixes positions in a way the cache "
                             "does not reproduce)")
