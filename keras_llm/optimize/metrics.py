"""Quality of an optimized model against its reference on the same text."""

import numpy as np
import tensorflow as tf


def _log_softmax(logits):
    return tf.nn.log_softmax(tf.cast(logits, tf.float64), axis=-1).numpy()


def perplexity_and_fidelity(model, reference_model, token_ids_batches):
    """Perplexity of `model` and how closely it follows `reference_model`.

    Both models read the same `(B, T)` token-id batches (no padding); at
    every position but the last, each gives a next-token distribution.

    Args:
        model: the optimized model, `token_ids (B, T) -> logits (B, T, V)`.
        reference_model: the model it came from.
        token_ids_batches: iterable of `(B, T)` int arrays, T >= 2.

    Returns:
        {"perplexity": exp(mean next-token NLL of `model`),
         "reference_perplexity": the same for `reference_model`,
         "mean_kl": KL(reference || model) in nats, averaged over positions,
         "top1_agreement": fraction of positions where both argmaxes agree,
         "positions": number of positions scored}
    """
    nll = ref_nll = kl = agree = 0.0
    count = 0
    for batch in token_ids_batches:
        ids = np.asarray(batch, np.int32)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"batches must be (B, T>=2) token ids, got shape {ids.shape}")
        inputs = tf.constant(ids[:, :-1])
        targets = ids[:, 1:]
        log_p = _log_softmax(model(inputs, training=False))            # (B, T-1, V)
        log_r = _log_softmax(reference_model(inputs, training=False))
        picked = np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
        ref_picked = np.take_along_axis(log_r, targets[..., None], axis=-1)[..., 0]
        nll -= picked.sum()
        ref_nll -= ref_picked.sum()
        kl += np.sum(np.exp(log_r) * (log_r - log_p))
        agree += np.sum(np.argmax(log_p, -1) == np.argmax(log_r, -1))
        count += targets.size
    if count == 0:
        raise ValueError("no token positions to score")
    return {
        "perplexity": float(np.exp(nll / count)),
        "reference_perplexity": float(np.exp(ref_nll / count)),
        "mean_kl": float(kl / count),
        "top1_agreement": float(agree / count),
        "positions": int(count),
    }
