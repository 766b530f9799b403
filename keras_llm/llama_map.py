"""A user's own Llama-shaped Keras model as keras-llm's Llama (the full fast path).

A hand-written Llama (its own RMSNorm, rotary and grouped-query attention
layers, any layer names) computes what `build_llama` computes; only the
names differ. `to_llama` finds each of its weights' place in `build_llama`'s
layers, copies them into a model `build_llama` makes, and keeps that model
only when its logits equal the user's (within float32 round-off) on a probe:
then it decodes with a KV cache on LiteRT or XLA instead of recomputing the
whole sequence every token.

The weight-name map: keras-llm's layer names, one weight each, are

    token_embedding                  (V, H)   the token embedding table
    layer_{i}_attention_norm         (H,)     RMSNorm scale before attention
    layer_{i}_query                  (H, Nq*D)  kernels as `Dense` holds them: (in, out)
    layer_{i}_key                    (H, Nkv*D)
    layer_{i}_value                  (H, Nkv*D)
    layer_{i}_attention_output       (Nq*D, H)
    layer_{i}_mlp_norm               (H,)
    layer_{i}_mlp_gate               (H, I)   passed through SiLU
    layer_{i}_mlp_up                 (H, I)
    layer_{i}_mlp_down               (I, H)
    final_norm                       (H,)
    lm_head                          (H, V)   absent when the head is the embedding

Without a `weight_map`, the user's weights are taken in the order the model
holds them (`model.weights`: layer by layer, as they were created), which is
this order for a model written the usual way; gate and up are told apart by
the probe. With one, each keras-llm name above (with `{i}` for the block) maps
to the user's weight name (with `{i}` too), e.g.
`{"layer_{i}_query": "block_{i}/attention/q/kernel", ...}`.

Rotary embeddings rotate the two halves of each head (the Hugging Face
layout); queries are scaled by `1/sqrt(D)`. Head counts, `rope_theta` and the
norm epsilon come from the arguments, else from the user's layers' configs
(`num_heads`/`num_kv_heads`/`head_dim`, `theta`/`rope_theta`,
`epsilon`/`eps`), else Llama's defaults; the probe checks the result.

Example:
    >>> fast = to_llama(user_model)           # ValueError when it is not a Llama
    >>> lm = keras_llm.LanguageModel(user_model)  # does this itself
"""

import numpy as np

from keras_llm.config import LlamaConfig

BLOCK = ("attention_norm", "query", "key", "value", "attention_output", "mlp_norm",
         "mlp_gate", "mlp_up", "mlp_down")

# Names user layers give the hyperparameters `to_llama` reads from their configs.
_HEADS = ("num_heads", "num_query_heads", "n_heads", "num_attention_heads")
_KV_HEADS = ("num_kv_heads", "num_key_value_heads", "n_kv_heads")
_HEAD_DIM = ("head_dim", "key_dim", "head_size")
_THETA = ("theta", "rope_theta", "base", "rope_base")
_EPSILON = ("epsilon", "eps", "rms_norm_epsilon")


def _weight_name(weight):
    return weight.name.split(":")[0]


def _config_value(model, names):
    """The first value of any of `names` in the configs of the model's layers
    (nested ones included), or None."""
    for layer in model.submodules:
        try:
            config = layer.get_config()
        except (NotImplementedError, AttributeError, TypeError):
            continue
        for name in names:
            value = config.get(name) if isinstance(config, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
    return None


def _ordered(model, vocabulary):
    """`{keras-llm name: array}` from the order of `model.weights`."""
    shapes = [tuple(w.shape) for w in model.weights]  # checked before any weight is copied
    if not shapes or len(shapes[0]) != 2 or shapes[0][0] != vocabulary:
        raise ValueError("its first weight is not a (vocabulary, hidden) token embedding")
    head = len(shapes[-1]) == 2 and shapes[-1][-1] == vocabulary
    body = len(shapes) - 2 - int(head)  # embedding, final norm, head
    if body <= 0 or body % len(BLOCK):
        raise ValueError(f"its {len(shapes)} weights are not an embedding, blocks of "
                         f"{len(BLOCK)} ({', '.join(BLOCK)}), a final norm and a head")
    arrays = [np.asarray(w.numpy()) for w in model.weights]
    named = {"token_embedding": arrays[0], "final_norm": arrays[1 + body]}
    for i in range(body // len(BLOCK)):
        for j, part in enumerate(BLOCK):
            named[f"layer_{i}_{part}"] = arrays[1 + i * len(BLOCK) + j]
    if head:
        named["lm_head"] = arrays[-1]
    return named


def _mapped(model, weight_map):
    """`{keras-llm name: array}` from an explicit `weight_map`."""
    weights = {_weight_name(w): w for w in model.weights}
    named = {}
    for ours, theirs in weight_map.items():
        count = 1 if "{i}" not in ours else None
        i = 0
        while count is None or i < count:
            source = theirs.format(i=i)
            if source not in weights:
                if count is None and i > 0:
                    break
                raise ValueError(f"weight_map: the model has no weight {source!r} "
                                 f"(for {ours.format(i=i)!r})")
            named[ours.format(i=i)] = np.asarray(weights[source].numpy())
            i += 1
    return named


def _config(named, model, vocabulary, overrides):
    """The `LlamaConfig` the weights and the user's layer configs say."""
    embedding = named["token_embedding"]
    hidden = embedding.shape[1]
    layers = sum(1 for name in named if name.endswith("_attention_norm"))
    query, key = named["layer_0_query"], named["layer_0_key"]
    heads = overrides.get("num_query_heads") or _config_value(model, _HEADS)
    kv_heads = overrides.get("num_key_value_heads") or _config_value(model, _KV_HEADS)
    head_dim = overrides.get("head_dim") or _config_value(model, _HEAD_DIM)
    if heads is None and head_dim:
        heads = query.shape[1] // int(head_dim)
    if heads is None:
        raise ValueError("the number of attention heads is not in any layer's config "
                         "(pass num_query_heads=)")
    head_dim = int(head_dim or query.shape[1] // int(heads))
    kv_heads = int(kv_heads or key.shape[1] // head_dim)
    values = dict(
        vocabulary_size=vocabulary, hidden_dim=hidden, num_layers=layers,
        num_query_heads=int(heads), num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_dim=named["layer_0_mlp_gate"].shape[1],
        rope_theta=float(overrides.get("rope_theta") or _config_value(model, _THETA) or 10000.0),
        rms_norm_epsilon=float(overrides.get("rms_norm_epsilon")
                               or _config_value(model, _EPSILON) or 1e-6),
        context_length=int(overrides.get("context_length") or 2048),
        tie_word_embeddings="lm_head" not in named)
    return LlamaConfig(**values)


def _difference(model, fast, length, seed):
    """Largest logit difference between the two on fixed random ids, and
    the largest logit."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    vocabulary = fast.output_shape[-1]
    ids = tf.constant(np.random.default_rng(seed).integers(0, vocabulary, size=(2, length)),
                      tf.int32)
    theirs = np.asarray(tf.cast(model(ids, training=False), tf.float32))
    ours = np.asarray(fast(ids, training=False))
    return float(np.max(np.abs(theirs - ours))), float(np.max(np.abs(theirs)))


def to_llama(model, weight_map=None, probe_length=16, seed=0, **overrides):
    """`model` rebuilt by `build_llama` with its own weights, checked.

    Args:
        model: a Keras causal LM, token ids `(B, T)` -> logits `(B, T, V)`,
            shaped as a Llama (see the module docstring).
        weight_map: `{keras-llm layer name: the model's weight name}` (both
            may use `{i}` for the block index); None: by weight order.
        probe_length: tokens in the equality probe.
        seed: the probe's seed.
        **overrides: `LlamaConfig` fields the model does not say
            (`num_query_heads`, `num_key_value_heads`, `head_dim`,
            `rope_theta`, `rms_norm_epsilon`, `context_length`).

    Returns:
        A keras-llm Llama (Functional) whose logits equal `model`'s.

    Raises:
        ValueError: the weights do not fit a Llama, or the rebuilt model's
            logits differ from `model`'s (it computes something else).
    """
    try:
        return _to_llama(model, weight_map, probe_length, seed, overrides)
    except (KeyError, IndexError, TypeError, ZeroDivisionError) as error:
        raise ValueError(f"its weights do not fit a Llama ({type(error).__name__}: {error})"
                         ) from None


def _to_llama(model, weight_map, probe_length, seed, overrides):
    from keras_llm.models import assign_weights, build_llama  # pylint: disable=import-outside-toplevel
    vocabulary = model.output_shape[-1] if isinstance(getattr(model, "output_shape", None),
                                                      tuple) else None
    if not isinstance(vocabulary, int):
        raise ValueError("its output's vocabulary size is unknown")
    named = _mapped(model, weight_map) if weight_map else _ordered(model, vocabulary)
    config = _config(named, model, vocabulary, overrides)
    fast = build_llama(config, name=f"{model.name}_llama")
    worst = None
    orders = (False, True) if weight_map is None else (False,)  # gate and up by order: try both
    for swap in orders:
        trial = dict(named)
        if swap:
            for i in range(config.num_layers):
                trial[f"layer_{i}_mlp_gate"], trial[f"layer_{i}_mlp_up"] = (
                    named[f"layer_{i}_mlp_up"], named[f"layer_{i}_mlp_gate"])
        assign_weights(fast, {name: [array] for name, array in trial.items()},
                       "the mapped weights")
        difference, scale = _difference(model, fast, probe_length, seed)
        if difference <= 1e-4 * max(1.0, scale):
            return fast
        worst = difference if worst is None else min(worst, difference)
    raise ValueError(f"rebuilt as a Llama ({config.num_layers} layers, {config.num_query_heads}/"
                     f"{config.num_key_value_heads} heads of {config.head_dim}, rope_theta "
                     f"{config.rope_theta}, epsilon {config.rms_norm_epsilon}) its logits differ "
                     f"by up to {worst:.3g}: it is not a Llama as build_llama computes one")
