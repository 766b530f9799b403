"""Causal grouped-query attention with RoPE and an optional KV cache."""

import tensorflow as tf
import tf_keras as keras

from keras_llm.layers.kv_cache import current_cache_context
from keras_llm.layers.rotary import apply_rotary


@keras.saving.register_keras_serializable(package="keras_llm")
class CachedAttention(keras.layers.Layer):
    """The weightless core of attention: RoPE, scores, mask, softmax, mix.

    The projections around it are plain `Dense` layers of the model, so
    TF-MOT can prune and quantize them. Scores and softmax run in float32.

    Called on `[query, key, value]` projections, `(B, T, H*D)`,
    `(B, T, KV*D)`, `(B, T, KV*D)`, it returns `(B, T, H*D)`. Without a cache
    context it attends causally within the call; inside an active
    `KVCacheContext` it writes this call's keys and values into the cache slot
    of `layer_index` and attends over the whole cache.

    Args:
        num_query_heads: H.
        num_key_value_heads: KV; H must be a multiple of it.
        head_dim: D.
        rope_theta: RoPE base.
        layer_index: which cache entry this layer owns.
        max_sequence_length: longest sequence (prompt plus generation).
        rope_scaling: None, or Llama 3.1's RoPE rescaling (see `apply_rotary`).

    Example:
        >>> att = CachedAttention(4, 2, 8, 10000.0, layer_index=0)
        >>> out = att([tf.zeros([1, 5, 32]), tf.zeros([1, 5, 16]), tf.zeros([1, 5, 16])])
    """

    def __init__(self, num_query_heads, num_key_value_heads, head_dim,
                 rope_theta=10000.0, layer_index=0, max_sequence_length=2048,
                 rope_scaling=None, **kwargs):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError("num_query_heads must be a multiple of num_key_value_heads")
        self.num_query_heads = int(num_query_heads)
        self.num_key_value_heads = int(num_key_value_heads)
        self.head_dim = int(head_dim)
        self.rope_theta = float(rope_theta)
        self.layer_index = int(layer_index)
        self.max_sequence_length = int(max_sequence_length)
        self.rope_scaling = None if not rope_scaling else dict(rope_scaling)

    def call(self, inputs):
        query, key, value = inputs
        heads, kv_heads, dim = self.num_query_heads, self.num_key_value_heads, self.head_dim
        groups = heads // kv_heads
        batch, length = tf.shape(query)[0], tf.shape(query)[1]
        query = tf.reshape(query, [batch, length, heads, dim])
        key = tf.reshape(key, [batch, length, kv_heads, dim])
        value = tf.reshape(value, [batch, length, kv_heads, dim])

        context = current_cache_context()
        if context is None:
            positions = tf.range(length)[tf.newaxis, :]  # (1, T)
        else:
            positions = context.positions(length)  # (B, T)
        query = apply_rotary(query, positions, self.rope_theta, self.rope_scaling)
        key = tf.cast(apply_rotary(key, positions, self.rope_theta, self.rope_scaling),
                      value.dtype)

        key = tf.transpose(key, [0, 2, 1, 3])  # (B, KV, T, D)
        value = tf.transpose(value, [0, 2, 1, 3])
        query = tf.reshape(query, [batch, length, kv_heads, groups, dim])
        query = tf.transpose(query, [0, 2, 3, 1, 4]) * (dim ** -0.5)  # (B, KV, G, T, D)
        if context is not None and getattr(context, "separate_past", False):
            # The past stays where it is (an input buffer of a runtime that
            # owns the cache); attend over it and over this call's keys as two
            # blocks, so the buffers are never copied.
            past_keys, past_values = context.past(self.layer_index, key, value)
            past_bias, new_bias = context.attention_biases(length, tf.shape(past_keys)[2])
            one = query.shape[3] == 1  # a decode step: this call's one key is a vector
            new_scores = (tf.reduce_sum(query * key[:, :, tf.newaxis], -1, keepdims=True) if one
                          else tf.einsum("bkgtd,bksd->bkgts", query, key))
            scores = tf.concat(
                [tf.einsum("bkgtd,bksd->bkgts", query, past_keys) + past_bias,
                 new_scores + new_bias], axis=-1)
            probs = tf.nn.softmax(scores, axis=-1)
            split = tf.shape(past_keys)[2]
            mixed = self._mix(probs[..., :split], past_values) + (
                probs[..., split:] * value[:, :, tf.newaxis] if one
                else self._mix(probs[..., split:], value))
        else:
            if context is None:
                keys, values = key, value
                causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
                mask = causal[tf.newaxis, tf.newaxis, tf.newaxis]  # (1, 1, 1, T, T)
            else:
                keys, values = context.update(self.layer_index, key, value)  # (B, KV, S, D)
                mask = context.attention_mask(length, tf.shape(keys)[2])  # (B, 1, 1, T, S)
            probs = tf.nn.softmax(self._scores(query, keys, mask), axis=-1)
            mixed = self._mix(probs, values)
        mixed = tf.transpose(mixed, [0, 3, 1, 2, 4])  # (B, T, KV, G, D)
        return tf.cast(tf.reshape(mixed, [batch, length, heads * dim]), self.compute_dtype)

    @staticmethod
    def _scores(query, keys, mask):
        """Masked scores `(B, KV, G, T, S)` of queries against `(B, KV, S, D)` keys."""
        scores = tf.einsum("bkgtd,bksd->bkgts", query, tf.cast(keys, tf.float32))
        return tf.where(mask, scores, tf.constant(-1e30, tf.float32))

    @staticmethod
    def _mix(probs, values):
        return tf.einsum("bkgts,bksd->bkgtd", tf.cast(probs, values.dtype), values)

    def compute_output_shape(self, input_shape):
        query_shape = tf.TensorShape(input_shape[0])
        return query_shape[:-1].concatenate([self.num_query_heads * self.head_dim])

    def get_config(self):
        extra = {"rope_scaling": dict(self.rope_scaling)} if self.rope_scaling else {}
        return {
            **super().get_config(), **extra,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "layer_index": self.layer_index,
            "max_sequence_length": self.max_sequence_length,
        }
