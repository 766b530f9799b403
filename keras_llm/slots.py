"""Prefill and single decode steps over sequence slots, for a serving engine.

A `SlotDecoder` owns the KV cache of a fixed number of sequence slots in
`tf.Variable`s, so a decode step updates it in place instead of passing it in
and out (at 16 slots of 1,024 tokens SmolLM2's cache is 750 MB). Requests
join and leave between steps: `prefill` runs one prompt and writes its keys
and values into a free slot, `decode` advances every slot by one token, each
at its own position. The math is the model's own forward pass, run under a
`SlotCacheContext`; sampling is `sample_next` with per-slot parameters and
steps, so a request gets the same tokens as from `Generator`.

Example:
    >>> dec = SlotDecoder(model)
    >>> dec.allocate(tf.constant(4), tf.constant(512))
    >>> first = dec.prefill(ids, key_start, slot, temperature, top_k, top_p, seed)
    >>> nxt = dec.decode(tokens, index, key_start, step, temperature, top_k, top_p, seed)
"""

import tensorflow as tf

from keras_llm.layers import KVCacheContext
from keras_llm.models import config_from_model, find_layer
from keras_llm.samplers import sample_next


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


class SlotDecoder(tf.Module):
    """Slot-based prefill/decode functions with the cache in variables.

    Args:
        model: a keras-llm Functional model.
        stop_ids: ids that end a sequence (returned flags say which slot stopped).
        jit_compile: compile `prefill` and `decode` with XLA.
    """

    def __init__(self, model, stop_ids=(), jit_compile=True):
        super().__init__(name="slot_decoder")
        self.model = model
        config = config_from_model(model)
        self._config = config
        dtype = tf.as_dtype(find_layer(model, "layer_0_key").compute_dtype)
        shape = tf.TensorShape([None, config.num_key_value_heads, None, config.head_dim])
        empty = tf.zeros([0, config.num_key_value_heads, 0, config.head_dim], dtype)
        self.cache = [(tf.Variable(empty, shape=shape, trainable=False, name=f"keys_{i}"),
                       tf.Variable(empty, shape=shape, trainable=False, name=f"values_{i}"))
                      for i in range(config.num_layers)]
        self._stop_ids = tf.constant(list(stop_ids) or [-1], tf.int32)
        scalar = tf.TensorSpec([], tf.int32)
        rows = lambda dtype, name: tf.TensorSpec([None], dtype, name=name)  # noqa: E731
        sampling = [rows(tf.float32, "temperature"), rows(tf.int32, "top_k"),
                    rows(tf.float32, "top_p"), rows(tf.int32, "seed")]
        self.allocate = tf.function(self._allocate, input_signature=[scalar, scalar])
        self.prefill = tf.function(
            self._prefill, jit_compile=jit_compile,
            input_signature=[tf.TensorSpec([1, None], tf.int32, name="token_ids"),
                             rows(tf.int32, "key_start"), scalar, *sampling])
        self.decode = tf.function(
            self._decode, jit_compile=jit_compile,
            input_signature=[rows(tf.int32, "tokens"), rows(tf.int32, "index"),
                             rows(tf.int32, "key_start"), rows(tf.int32, "step"), *sampling])

    def _allocate(self, num_slots, max_length):
        """(Re)allocate the cache: `num_slots` sequences of `max_length` tokens."""
        c = self._config
        zeros = tf.zeros([num_slots, c.num_key_value_heads, max_length, c.head_dim],
                         self.cache[0][0].dtype)
        for keys, values in self.cache:
            keys.assign(zeros)
            values.assign(zeros)
        return tf.size(zeros, out_type=tf.int64) * 2 * len(self.cache) * zeros.dtype.size

    def _prefill(self, token_ids, key_start, slot, temperature, top_k, top_p, seed):
        """Run one left-padded prompt `(1, P)`, store its keys/values in row
        `slot` (positions `0..P-1`) and sample its first token.

        Returns (token (1,), stopped (1,)).
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
        token = sample_next(logits, temperature, top_k, top_p, seed, tf.zeros_like(seed))
        return token, self._stopped(token)

    def _decode(self, tokens, index, key_start, step, temperature, top_k, top_p, seed):
        """Feed `tokens (k,)` at positions `index (k,)` of slots `0..k-1` and
        sample the next token of each (its `step`-th generated token). Slots
        from `k` on are untouched, so a scheduler that keeps running requests
        in low slots pays for `k` rows, not for every allocated slot.

        Returns (next tokens (k,), stopped (k,)).
        """
        context = SlotCacheContext(self.cache, index, key_start)
        with context.active():
            logits = self.model(tokens[:, tf.newaxis], training=False)[:, -1, :]
        token = sample_next(logits, temperature, top_k, top_p, seed, step)
        return token, self._stopped(token)

    def _stopped(self, token):
        return tf.reduce_any(token[:, tf.newaxis] == self._stop_ids[tf.newaxis, :], axis=-1)
