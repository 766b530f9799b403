"""The key/value cache that attention layers use during generation.

A model is an ordinary Functional model mapping token ids to logits. To run it
on a cache, the generation code opens a `KVCacheContext` around the model
call; each `CachedAttention` layer then writes its new keys and values into
the context's pre-allocated buffers and attends over them. The model graph,
its layers and its weights stay the same: there is one forward pass.
"""

import contextlib
import threading

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

_STATE = threading.local()


def current_cache_context():
    """The innermost active `KVCacheContext`, or None."""
    stack = getattr(_STATE, "stack", None)
    return stack[-1] if stack else None


class KVCacheContext:
    """Fixed-size key/value buffers for one forward call.

    Slots `[0, max_length)` hold keys and values of every layer. Rows are
    left-aligned on a shared slot index: row `b`'s tokens start at slot
    `key_start[b]` (left padding before it), and the `T` tokens of this call
    are written at slots `index .. index + T - 1` of every row.

    Args:
        caches: list with one `(keys, values)` pair per attention layer, each
            `(B, num_key_value_heads, max_length, head_dim)`.
        index: scalar int32, the slot of this call's first token.
        key_start: int32 `(B,)`, the first real slot of each row.
        last_position_only: compute logits for the last position only.

    Example:
        >>> ctx = KVCacheContext(caches, index=0, key_start=pad)
        >>> with ctx.active():
        ...     logits = model(token_ids)
        >>> caches = ctx.caches
    """

    def __init__(self, caches, index, key_start, last_position_only=True):
        self.caches = list(caches)
        self.index = tf.convert_to_tensor(index, tf.int32)
        self.key_start = tf.convert_to_tensor(key_start, tf.int32)
        self.last_position_only = last_position_only

    @staticmethod
    def allocate(batch_size, num_layers, num_key_value_heads, max_length,
                 head_dim, dtype=tf.float32):
        """Zero-filled caches: a list of `num_layers` `(keys, values)` pairs."""
        shape = [batch_size, num_key_value_heads, max_length, head_dim]
        return [(tf.zeros(shape, dtype), tf.zeros(shape, dtype))
                for _ in range(num_layers)]

    @contextlib.contextmanager
    def active(self):
        stack = getattr(_STATE, "stack", None)
        if stack is None:
            stack = _STATE.stack = []
        stack.append(self)
        try:
            yield self
        finally:
            stack.pop()

    def positions(self, length):
        """RoPE positions `(B, T)` of this call's tokens."""
        offsets = self.index + tf.range(length, dtype=tf.int32)
        return offsets[tf.newaxis, :] - self.key_start[:, tf.newaxis]

    def update(self, layer_index, keys, values):
        """Write `(B, KV, T, D)` keys and values at `index`; return the
        whole buffers `(B, KV, S, D)` of that layer."""
        cached_keys, cached_values = self.caches[layer_index]
        cached_keys = _write_slots(cached_keys, keys, self.index)
        cached_values = _write_slots(cached_values, values, self.index)
        self.caches[layer_index] = (cached_keys, cached_values)
        return cached_keys, cached_values

    def attention_mask(self, length, max_length):
        """Boolean `(B, 1, 1, T, S)`: may query `t` of row `b` see slot `s`."""
        slots = tf.range(max_length, dtype=tf.int32)
        query_slots = self.index + tf.range(length, dtype=tf.int32)
        causal = slots[tf.newaxis, tf.newaxis, :] <= query_slots[tf.newaxis, :, tf.newaxis]
        started = slots[tf.newaxis, tf.newaxis, :] >= self.key_start[:, tf.newaxis, tf.newaxis]
        mask = causal & started  # (B, T, S)
        return mask[:, tf.newaxis, tf.newaxis, :, :]


def _write_slots(buffer, update, index):
    """Dynamic update slice along the slot axis (2): in place under XLA."""
    zero = tf.zeros([], tf.int32)
    return xla.dynamic_update_slice(
        buffer, tf.cast(update, buffer.dtype), tf.stack([zero, zero, index, zero]))
