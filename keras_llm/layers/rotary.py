"""Rotary position embedding (RoPE), "rotate half" convention."""

import math

import numpy as np
import tensorflow as tf

ROPE_SCALING_TYPES = ("llama3",)


def llama3_inverse_frequency(head_dim, theta, factor, low_freq_factor, high_freq_factor,
                             original_max_position_embeddings):
    """Llama 3.1's rescaled RoPE frequencies (float32 `(D/2,)`), as Hugging
    Face's `_compute_llama3_parameters`: long wavelengths divided by
    `factor`, short ones kept, the band between interpolated."""
    inverse = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inverse
    low, high = (original_max_position_embeddings / low_freq_factor,
                 original_max_position_embeddings / high_freq_factor)
    scaled = np.where(wavelength > low, inverse / factor, inverse)
    smooth = ((original_max_position_embeddings / wavelength - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    medium = (wavelength >= high) & (wavelength <= low)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return scaled.astype(np.float32)


def apply_rotary(x, positions, theta, scaling=None):
    """Rotate `x` by its positions.

    Args:
        x: `(B, T, N, D)` queries or keys.
        positions: int `(B, T)` or `(1, T)` positions.
        theta: RoPE base.
        scaling: None, or a dict `{"rope_type": "llama3", "factor": ...,
            "low_freq_factor": ..., "high_freq_factor": ...,
            "original_max_position_embeddings": ...}`.

    Returns:
        float32 `(B, T, N, D)`; pairs `(i, i + D/2)` rotated by
        `position * theta ** (-2i / D)` (rescaled with `scaling`).
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    if scaling:
        options = {k: v for k, v in scaling.items() if k != "rope_type"}
        inverse_frequency = tf.constant(llama3_inverse_frequency(head_dim, theta, **options))
    else:
        exponents = tf.range(half, dtype=tf.float32) * (2.0 / head_dim)
        inverse_frequency = tf.pow(tf.constant(theta, tf.float32), -exponents)  # (D/2,)
    angles = tf.cast(positions, tf.float32)[..., tf.newaxis] * inverse_frequency  # (B, T, D/2)
    cos = tf.cos(angles)[:, :, tf.newaxis, :]  # (B, T, 1, D/2)
    sin = tf.sin(angles)[:, :, tf.newaxis, :]
    x = tf.cast(x, tf.float32)
    first, second = x[..., :half], x[..., half:]
    return tf.concat([first * cos - second * sin, second * cos + first * sin], axis=-1)
