"""Next-token sampling, kept apart from the model.

`sample_next` sees only logits and per-row parameters, so it is testable
without a model and runs inside an XLA-compiled decode loop. Rows with
`temperature <= 0` are greedy. Randomness is counter-based: the noise for row
`b` at step `s` depends only on `(seed[b], s)`, so a request samples the same
tokens whatever else shares its batch.
"""

import tensorflow as tf

_MASK32 = 0xFFFFFFFF


def _mix32(h):
    """Murmur3's 32-bit finalizer on int64 holding values in [0, 2**32)."""
    shift, xor, mask = tf.bitwise.right_shift, tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and
    h = xor(h, shift(h, tf.constant(16, tf.int64)))
    h = mask(h * 0x85EBCA6B, _MASK32)
    h = xor(h, shift(h, tf.constant(13, tf.int64)))
    h = mask(h * 0xC2B2AE35, _MASK32)
    return xor(h, shift(h, tf.constant(16, tf.int64)))


def uniform_noise(seeds, step, vocabulary_size):
    """Uniform floats in (0, 1), `(B, V)`, a pure function of `(seed, step)`.

    Args:
        seeds: int `(B,)`.
        step: int, scalar or `(B,)`: the index of the token being sampled.
        vocabulary_size: V (a Python int).
    """
    mask = tf.bitwise.bitwise_and
    seeds = mask(tf.cast(seeds, tf.int64), _MASK32)
    step = mask(tf.cast(step, tf.int64), _MASK32)
    row = _mix32(mask(seeds * 0x9E3779B1 + _mix32(step + 0x632BE5AB), _MASK32))  # (B,)
    index = mask(tf.range(vocabulary_size, dtype=tf.int64) * 0x27D4EB2F, _MASK32)  # (V,)
    bits = _mix32(tf.bitwise.bitwise_xor(row[:, tf.newaxis], index[tf.newaxis, :]))  # (B, V)
    # 23 bits: (bits + 0.5) / 2**23 is exact in float32 and strictly inside
    # (0, 1); with 24 the largest value rounded to 1.0 and its Gumbel noise
    # to +inf (a token top-k/top-p had removed could then be drawn).
    bits = tf.bitwise.right_shift(bits, tf.constant(9, tf.int64))
    return (tf.cast(bits, tf.float32) + 0.5) * (1.0 / (1 << 23))


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature-scale `logits` and set those outside top-k/top-p to -inf.

    Args:
        logits: float32 `(B, V)`.
        temperature: float `(B,)`, > 0.
        top_k: int `(B,)`; 0 (or >= V) keeps all.
        top_p: float `(B,)`; 1 (or <= 0) keeps all.

    Returns:
        float32 `(B, V)` scaled logits, filtered entries at -inf.
    """
    vocabulary_size = tf.shape(logits)[-1]
    scaled = logits / tf.maximum(temperature, 1e-6)[:, tf.newaxis]
    ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")  # (B, V)
    k = tf.where((top_k <= 0) | (top_k > vocabulary_size), vocabulary_size, top_k)
    kth_value = tf.gather(ordered, k - 1, batch_dims=1)  # (B,)
    top_p = tf.where((top_p <= 0.0) | (top_p > 1.0), 1.0, top_p)
    probs = tf.nn.softmax(ordered, axis=-1)
    mass_before = tf.cumsum(probs, axis=-1, exclusive=True)
    nucleus = tf.reduce_sum(tf.cast(mass_before < top_p[:, tf.newaxis], tf.int32), axis=-1)
    nucleus = tf.clip_by_value(nucleus, 1, vocabulary_size)
    nucleus_value = tf.gather(ordered, nucleus - 1, batch_dims=1)
    threshold = tf.maximum(kth_value, nucleus_value)[:, tf.newaxis]
    return tf.where(scaled >= threshold, scaled, tf.constant(-float("inf"), tf.float32))


def sample_next(logits, temperature, top_k, top_p, seeds, step):
    """Choose one token per row.

    Args:
        logits: float `(B, V)`.
        temperature: float `(B,)`; rows with `<= 0` take the argmax.
        top_k: int `(B,)`.
        top_p: float `(B,)`.
        seeds: int `(B,)`.
        step: int, scalar or `(B,)`: position of the token in the generated
            sequence (per row when rows are at different steps).

    Returns:
        int32 `(B,)` token ids.

    Example:
        >>> sample_next(tf.constant([[0.0, 3.0, 1.0]]), tf.constant([0.0]),
        ...             tf.constant([0]), tf.constant([1.0]), tf.constant([0]), 0)
        <tf.Tensor: shape=(1,), dtype=int32, numpy=array([1], dtype=int32)>
    """
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    sampling = temperature > 0.0
    vocabulary_size = logits.shape[-1]

    def draw():
        filtered = filter_logits(logits, temperature, top_k, top_p)
        gumbel = -tf.math.log(-tf.math.log(uniform_noise(seeds, step, vocabulary_size)))
        drawn = tf.argmax(filtered + gumbel, axis=-1, output_type=tf.int32)
        return tf.where(sampling, drawn, greedy)

    return tf.cond(tf.reduce_any(sampling), draw, lambda: greedy)
