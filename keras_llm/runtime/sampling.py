"""Next-token sampling on the host (numpy), for every backend of the engine.

The same rule as `keras_llm.samplers` (which the SavedModel's self-contained
decode loop runs in TensorFlow): temperature, then top-k and top-p, then the
Gumbel-max trick with counter-based noise, so row `b`'s draw at step `s`
depends only on `(seed[b], s)`. The noise is integer hashing and matches the
TensorFlow version bit for bit; tests compare the two samplers' tokens.
"""

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def _mix32(h):
    """Murmur3's 32-bit finalizer on uint64 holding values in [0, 2**32)."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & _MASK32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & _MASK32
    return h ^ (h >> np.uint64(16))


def uniform_noise(seeds, steps, vocabulary_size):
    """Uniform float32 in (0, 1), `(B, V)`, a pure function of `(seed, step)`."""
    with np.errstate(over="ignore"):
        seeds = np.asarray(seeds, np.int64).astype(np.uint64) & _MASK32
        steps = np.broadcast_to(np.asarray(steps, np.int64), seeds.shape).astype(np.uint64) & _MASK32
        row = _mix32((seeds * np.uint64(0x9E3779B1) + _mix32(steps + np.uint64(0x632BE5AB)))
                     & _MASK32)  # (B,)
        index = (np.arange(vocabulary_size, dtype=np.uint64) * np.uint64(0x27D4EB2F)) & _MASK32
        bits = _mix32(row[:, np.newaxis] ^ index[np.newaxis, :]) >> np.uint64(9)  # (B, V)
    # 23 bits, exact in float32: never 0 or 1 (see `keras_llm.samplers`).
    return (bits.astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 23))


def _filter(logits, temperature, top_k, top_p):
    """Scaled logits `(V,)` with entries outside top-k/top-p at -inf."""
    vocabulary_size = logits.shape[-1]
    scaled = logits / np.float32(max(temperature, 1e-6))
    ordered = -np.sort(-scaled)
    k = vocabulary_size if top_k <= 0 or top_k > vocabulary_size else top_k
    threshold = ordered[k - 1]
    if top_p < 1.0:
        probs = np.exp(ordered - ordered[0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        nucleus = int(np.clip(np.sum(before < np.float32(top_p)), 1, vocabulary_size))
        threshold = max(threshold, ordered[nucleus - 1])
    return np.where(scaled >= threshold, scaled, np.float32(-np.inf))


def sample(logits, temperature, top_k, top_p, seeds, steps):
    """One token per row.

    Args:
        logits: float `(B, V)`.
        temperature, top_k, top_p, seeds, steps: per-row `(B,)` (or scalars);
            rows with `temperature <= 0` take the argmax.

    Returns:
        int32 `(B,)`.
    """
    logits = np.asarray(logits, np.float32)
    batch = logits.shape[0]
    rows = lambda value, dtype: np.broadcast_to(np.asarray(value, dtype), (batch,))  # noqa: E731
    temperature, top_k = rows(temperature, np.float32), rows(top_k, np.int64)
    top_p, seeds, steps = rows(top_p, np.float32), rows(seeds, np.int64), rows(steps, np.int64)
    tokens = np.argmax(logits, axis=-1).astype(np.int32)
    drawn = np.flatnonzero(temperature > 0)
    if len(drawn):
        noise = uniform_noise(seeds[drawn], steps[drawn], logits.shape[-1])
        gumbel = -np.log(-np.log(noise))
        for j, row in enumerate(drawn):
            filtered = _filter(logits[row], float(temperature[row]), int(top_k[row]),
                               float(top_p[row]))
            tokens[row] = int(np.argmax(filtered + gumbel[j]))
    return tokens


def token_logprobs(logits, token, top):
    """`(logprob of token, [(id, logprob)] of the `top` most likely ids)`
    under the model's raw distribution (`logits`: `(V,)`)."""
    row = np.asarray(logits, np.float64)
    peak = row.max()
    logprobs = row - (peak + np.log(np.exp(row - peak).sum()))
    best = []
    if top > 0:
        ids = np.argpartition(-logprobs, top - 1)[:top]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = [(int(i), float(logprobs[i])) for i in ids]
    return float(logprobs[int(token)]), best
