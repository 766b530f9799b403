"""The XLA backend: per-step compiled prefill/decode over slots in variables.

The GPU/TPU path, and the CPU fallback for models LiteRT cannot convert.
`SlotDecoder` owns the KV cache of a fixed number of sequence slots in
`tf.Variable`s, so a step updates it in place instead of passing it in and
out. The math is the model's own forward pass under a `SlotCacheContext`.
A SavedModel written by `keras_llm.export` carries a `SlotDecoder` as its
`engine` attribute, so the server runs the same functions from the export.

Example:
    >>> backend = XLABackend(SlotDecoder(model), vocabulary_size=49152)
    >>> engine = Engine(backend, tokenizer)
"""

import os

import numpy as np
import tensorflow as tf

from keras_llm.generation import round_up
from keras_llm.layers import KVCacheContext
from keras_llm.models import config_from_model, find_layer
from keras_llm.runtime.backend import Backend, Capabilities, concrete, row_counts


class SlotCacheContext(KVCacheContext):
    """KV cache context for one decode step where each row (slot) is at its
    own position and the buffers are variables updated in place.

    Args:
        variables: list of `(keys, values)` `tf.Variable` pairs per layer,
            `(N, KV, S, D)`.
        index: int32 `(N,)`, the slot position each row's new token goes to.
        key_start: int32 `(N,)`, each row's first real position.
    """

    def __init__(self, variables, index, key_start):
        super().__init__(variables, tf.zeros([], tf.int32), key_start, last_position_only=True)
        self.row_index = tf.convert_to_tensor(index, tf.int32)

    def positions(self, length):
        del length  # one token per row
        return (self.row_index - self.key_start)[:, tf.newaxis]  # (N, 1)

    def update(self, layer_index, keys, values):
        """Scatter `(k, KV, 1, D)` into rows `0..k-1` at each row's position;
        return those rows of the buffers, `(k, KV, S, D)`."""
        key_var, value_var = self.caches[layer_index]
        rows, heads = tf.shape(keys)[0], tf.shape(keys)[1]
        row = tf.repeat(tf.range(rows), heads)  # (N*KV,)
        head = tf.tile(tf.range(heads), [rows])
        slot = tf.repeat(self.row_index, heads)
        indices = tf.stack([row, head, slot], axis=1)  # (N*KV, 3)
        width = keys.shape[-1]
        key_var.scatter_nd_update(indices, tf.reshape(tf.cast(keys, key_var.dtype), [-1, width]))
        value_var.scatter_nd_update(indices,
                                    tf.reshape(tf.cast(values, value_var.dtype), [-1, width]))
        return key_var.read_value()[:rows], value_var.read_value()[:rows]

    def attention_mask(self, length, max_length):
        slots = tf.range(max_length, dtype=tf.int32)[tf.newaxis, :]
        mask = (slots <= self.row_index[:, tf.newaxis]) & (slots >= self.key_start[:, tf.newaxis])
        return mask[:, tf.newaxis, tf.newaxis, tf.newaxis, :]  # (N, 1, 1, 1, S)


class Untracked:
    """Holds a value where `tf.Module` does not look.

    A Keras model tracked by a module that `tf.saved_model.save` writes has
    every layer's call traced again into the SavedModel (for SmolLM2, most
    of an export's time), though the signatures only need its variables:
    modules keep `weights` (a list of the variables) and the model in here.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class SlotDecoder(tf.Module):
    """Slot-based prefill/decode functions with the cache in variables.

    Args:
        model: a keras-llm Functional model.
        jit_compile: compile `prefill` and `decode` with XLA.
    """

    def __init__(self, model, jit_compile=True):
        super().__init__(name="slot_decoder")
        self._model = Untracked(model)
        self.weights = list(model.weights)
        config = config_from_model(model)
        self._config = config
        dtype = tf.as_dtype(find_layer(model, "layer_0_key").compute_dtype)
        shape = tf.TensorShape([None, config.num_key_value_heads, None, config.head_dim])
        empty = tf.zeros([0, config.num_key_value_heads, 0, config.head_dim], dtype)
        self.cache = [(tf.Variable(empty, shape=shape, trainable=False, name=f"keys_{i}"),
                       tf.Variable(empty, shape=shape, trainable=False, name=f"values_{i}"))
                      for i in range(config.num_layers)]
        scalar = tf.TensorSpec([], tf.int32)
        rows = lambda dtype, name: tf.TensorSpec([None], dtype, name=name)  # noqa: E731
        self.allocate = tf.function(self._allocate, input_signature=[scalar, scalar])
        self.prefill = tf.function(
            self._prefill, jit_compile=jit_compile,
            input_signature=[tf.TensorSpec([1, None], tf.int32, name="token_ids"),
                             rows(tf.int32, "key_start"), scalar])
        self.decode = tf.function(
            self._decode, jit_compile=jit_compile,
            input_signature=[rows(tf.int32, "tokens"), rows(tf.int32, "index"),
                             rows(tf.int32, "key_start")])

    @property
    def model(self):
        return self._model.value

    def _allocate(self, num_slots, max_length):
        """(Re)allocate the cache: `num_slots` sequences of `max_length` tokens."""
        c = self._config
        zeros = tf.zeros([num_slots, c.num_key_value_heads, max_length, c.head_dim],
                         self.cache[0][0].dtype)
        for keys, values in self.cache:
            keys.assign(zeros)
            values.assign(zeros)
        return tf.size(zeros, out_type=tf.int64) * 2 * len(self.cache) * zeros.dtype.size

    def _prefill(self, token_ids, key_start, slot):
        """Run one left-padded prompt `(1, P)` and store its keys/values in
        row `slot` (positions `0..P-1`).

        Returns (greedy token (1,), float32 logits (1, V)).
        """
        c = self._config
        length = tf.shape(token_ids)[1]
        scratch = KVCacheContext.allocate(1, c.num_layers, c.num_key_value_heads, length,
                                          c.head_dim, self.cache[0][0].dtype)
        context = KVCacheContext(scratch, 0, key_start, last_position_only=True)
        with context.active():
            logits = self.model(token_ids, training=False)[:, -1, :]
        heads = c.num_key_value_heads
        head = tf.repeat(tf.range(heads), length)
        position = tf.tile(tf.range(length), [heads])
        indices = tf.stack([tf.fill([heads * length], slot), head, position], axis=1)
        for (key_var, value_var), (keys, values) in zip(self.cache, context.caches):
            key_var.scatter_nd_update(indices, tf.reshape(keys, [heads * length, c.head_dim]))
            value_var.scatter_nd_update(indices, tf.reshape(values, [heads * length, c.head_dim]))
        return _outputs(logits)

    def _decode(self, tokens, index, key_start):
        """Feed `tokens (k,)` at positions `index (k,)` of slots `0..k-1`.
        Slots from `k` on are untouched, so a scheduler that keeps running
        requests in low slots pays for `k` rows, not for every slot.

        Returns (greedy next tokens (k,), float32 logits (k, V)).
        """
        context = SlotCacheContext(self.cache, index, key_start)
        with context.active():
            logits = self.model(tokens[:, tf.newaxis], training=False)[:, -1, :]
        return _outputs(logits)


def _outputs(logits):
    logits = tf.cast(logits, tf.float32)
    return tf.argmax(logits, axis=-1, output_type=tf.int32), logits


class XLABackend(Backend):
    """The engine's backend over `SlotDecoder` functions.

    Args:
        functions: a `SlotDecoder`, or the `engine` of a loaded export.
        vocabulary_size: logits per row.
        context_length: most positions the model supports.
        prompt_bucket: prompts are left-padded to a multiple of this (each
            padded length is one compiled prefill).
        max_slots: most sequences.
        dtype: the weights' dtype, for `capabilities`.
    """

    def __init__(self, functions, vocabulary_size, context_length, prompt_bucket=64,
                 max_slots=16, dtype="float32"):
        self.functions = functions
        self._prefill, self._decode = concrete(functions.prefill), concrete(functions.decode)
        self.prompt_bucket = int(prompt_bucket)
        self.capabilities = Capabilities("xla", int(max_slots), int(context_length),
                                         int(vocabulary_size), dtype)
        self.num_slots = 0

    @classmethod
    def from_model(cls, model, jit_compile=True, **options):
        config = config_from_model(model)
        dtype = find_layer(model, "layer_0_query").compute_dtype
        return cls(SlotDecoder(model, jit_compile=jit_compile), config.vocabulary_size,
                   config.context_length, dtype=dtype, **options)

    def allocate(self, num_slots, max_length):
        num_slots = min(int(num_slots), self.capabilities.max_slots)
        max_length = min(int(max_length), self.capabilities.max_length)
        self.functions.allocate(tf.constant(num_slots), tf.constant(max_length))
        self.num_slots, self.max_length = num_slots, max_length
        self._position = np.zeros([num_slots], np.int32)
        self._key_start = np.zeros([num_slots], np.int32)
        self.capabilities.row_counts = row_counts(num_slots)
        return num_slots, max_length

    def prompt_positions(self, length, reserve=0):
        # Left-padded to the bucket (one compiled prefill per bucket), unless
        # the padding would not leave room: then exactly (one more compile).
        padded = round_up(length, self.prompt_bucket)
        return padded if padded + reserve <= getattr(self, "max_length", padded) else length

    def prefill(self, token_ids, slot, reserve=0):
        ids = np.asarray(token_ids, np.int32).reshape(-1)
        padded_length = self.prompt_positions(len(ids), reserve)
        padded = np.zeros([1, padded_length], np.int32)
        padded[0, padded_length - len(ids):] = ids
        key_start = padded_length - len(ids)
        _, logits = self._prefill(tf.constant(padded), tf.constant([key_start], tf.int32),
                                  tf.constant(slot, tf.int32))
        self._position[slot] = padded_length
        self._key_start[slot] = key_start
        return logits.numpy()[0]

    def step(self, tokens, rows, need_logits=True):
        rows = np.asarray(rows, np.int64)
        count = next(c for c in self.capabilities.row_counts if c > rows.max())
        feed = np.zeros([count], np.int32)
        feed[rows] = tokens
        index = np.zeros([count], np.int32)
        index[rows] = self._position[rows]
        key_start = np.zeros([count], np.int32)
        key_start[rows] = self._key_start[rows]
        greedy, logits = self._decode(tf.constant(feed), tf.constant(index),
                                      tf.constant(key_start))
        self._position[rows] += 1
        return (greedy.numpy()[rows], logits.numpy()[rows] if need_logits else None)
