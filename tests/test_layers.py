"""Layers: numerics against plain numpy, and config round trips."""

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.layers import CachedAttention, KVCacheContext, LogitPositions, RMSNorm, TokenEmbedding
from keras_llm.layers.rotary import apply_rotary
from tests.helpers import assert_layer_round_trip

RNG = np.random.default_rng(1234)


def test_rms_norm_matches_numpy_and_round_trips():
    x = RNG.normal(size=(2, 3, 8)).astype("float32")
    layer = RMSNorm(epsilon=1e-6)
    layer(x)
    layer.set_weights([RNG.normal(size=(8,)).astype("float32")])
    expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * layer.get_weights()[0]
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert_layer_round_trip(layer, x)


def test_token_embedding_reverse_is_tied_head():
    layer = TokenEmbedding(50, 8)
    ids = np.array([[1, 2, 3]])
    hidden = layer(ids)
    logits = layer(hidden, reverse=True).numpy()
    table = layer.get_weights()[0]
    np.testing.assert_allclose(logits, hidden.numpy() @ table.T, rtol=1e-5, atol=1e-6)
    assert logits.shape == (1, 3, 50) and logits.dtype == np.float32
    assert_layer_round_trip(layer, ids)


def _numpy_rope(x, positions, theta):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = positions[..., None] * inv  # (B, T, D/2)
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def test_rotary_matches_numpy_and_is_relative():
    x = RNG.normal(size=(1, 5, 2, 8)).astype("float32")
    pos = np.arange(5)[None].astype("float32")
    out = apply_rotary(x, pos, 10000.0).numpy()
    np.testing.assert_allclose(out, _numpy_rope(x, pos, 10000.0), rtol=1e-4, atol=1e-5)
    # q(m).k(n) depends only on m - n.
    q, k = RNG.normal(size=(1, 1, 1, 8)), RNG.normal(size=(1, 1, 1, 8))
    dots = [float(np.sum(apply_rotary(q, [[m]], 100.0) * apply_rotary(k, [[m - 3]], 100.0)))
            for m in (3, 10, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def _numpy_attention(q, k, v, heads, kv_heads, dim, theta):
    b, t, _ = q.shape
    pos = np.arange(t)[None].astype("float64")
    q = _numpy_rope(q.reshape(b, t, heads, dim), pos, theta)
    k = _numpy_rope(k.reshape(b, t, kv_heads, dim), pos, theta)
    v = v.reshape(b, t, kv_heads, dim)
    out = np.zeros((b, t, heads, dim))
    for h in range(heads):
        kh = h // (heads // kv_heads)
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / np.sqrt(dim)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", p, v[:, :, kh])
    return out.reshape(b, t, heads * dim)


def _random_qkv(batch, length, heads, kv, dim):
    """Random query, key and value projections `(B, T, H*D)`, `(B, T, KV*D)` x 2."""
    return [RNG.normal(size=(batch, length, n * dim)).astype("float32") for n in (heads, kv, kv)]


def test_attention_matches_numpy_gqa_causal():
    heads, kv, dim = 4, 2, 8
    layer = CachedAttention(heads, kv, dim, rope_theta=500.0, layer_index=0)
    q, k, v = _random_qkv(2, 6, heads, kv, dim)
    out = layer([q, k, v]).numpy()
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, heads, kv, dim, 500.0),
                               rtol=1e-4, atol=1e-5)
    assert_layer_round_trip(layer, [q, k, v])


def test_attention_with_cache_matches_full_and_respects_left_padding():
    heads, kv, dim = 4, 2, 8
    layer = CachedAttention(heads, kv, dim, rope_theta=500.0, layer_index=1)
    q, k, v = _random_qkv(1, 5, heads, kv, dim)
    full = layer([q, k, v]).numpy()
    # Left-pad by 3 garbage tokens; key_start hides them.
    pad = lambda a: np.concatenate([RNG.normal(size=(1, 3, a.shape[-1])).astype("float32"), a], 1)  # noqa: E731
    caches = KVCacheContext.allocate(1, 2, kv, 16, dim)
    ctx = KVCacheContext(caches, 0, [3], last_position_only=False)
    with ctx.active():
        prefix = layer([pad(q)[:, :7], pad(k)[:, :7], pad(v)[:, :7]]).numpy()
    np.testing.assert_allclose(prefix[:, 3:], full[:, :4], rtol=1e-4, atol=1e-5)
    step = KVCacheContext(ctx.caches, 7, [3])
    with step.active():
        last = layer([q[:, 4:], k[:, 4:], v[:, 4:]]).numpy()
    np.testing.assert_allclose(last[:, 0], full[:, 4], rtol=1e-4, atol=1e-5)


def test_logit_positions_identity_without_cache_last_with_cache():
    x = tf.constant(RNG.normal(size=(2, 4, 3)).astype("float32"))
    layer = LogitPositions()
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    ctx = KVCacheContext([], 0, [0, 0], last_position_only=True)
    with ctx.active():
        np.testing.assert_array_equal(layer(x).numpy(), x.numpy()[:, -1:])
    assert_layer_round_trip(layer, x)


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="multiple"):
        CachedAttention(5, 2, 8)
