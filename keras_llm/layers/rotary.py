"""Rotary position embedding (RoPE), "rotate half" convention."""

import tensorflow as tf


def apply_rotary(x, positions, theta):
    """Rotate `x` by its positions.

    Args:
        x: `(B, T, N, D)` queries or keys.
        positions: int `(B, T)` or `(1, T)` positions.
        theta: RoPE base.

    Returns:
        float32 `(B, T, N, D)`; pairs `(i, i + D/2)` rotated by
        `position * theta ** (-2i / D)`.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    exponents = tf.range(half, dtype=tf.float32) * (2.0 / head_dim)
    inverse_frequency = tf.pow(tf.constant(theta, tf.float32), -exponents)  # (D/2,)
    angles = tf.cast(positions, tf.float32)[..., tf.newaxis] * inverse_frequency  # (B, T, D/2)
    cos = tf.cos(angles)[:, :, tf.newaxis, :]  # (B, T, 1, D/2)
    sin = tf.sin(angles)[:, :, tf.newaxis, :]
    x = tf.cast(x, tf.float32)
    first, second = x[..., :half], x[..., half:]
    return tf.concat([first * cos - second * sin, second * cos + first * sin], axis=-1)
