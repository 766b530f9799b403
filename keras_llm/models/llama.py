"""A Llama-family decoder as a Functional tf_keras model.

Every projection is a plain `Dense` (a bias only on query/key/value, and
only with `attention_bias`) and the token table a `TokenEmbedding` (an
`Embedding`), so TF-MOT's registries find them; the
layers of our own (`RMSNorm`, `CachedAttention`, `LogitPositions`) are small
and own no matmul weights. Layer names follow one scheme, `layer_{i}_query`,
`layer_{i}_mlp_gate`, ..., which weight import and export rely on.

The Llama-family variants keras-llm imports are options of the one builder
(see `LlamaConfig`): Qwen2's q/k/v bias, Gemma's scaled embedding, `1 + w`
norms and GeGLU, Llama 3.1's rescaled RoPE. Mistral and Phi-3 need none
(Phi-3's fused projections are split at import, `keras_llm.hf_import`).
"""

import tf_keras as keras

from keras_llm.config import LlamaConfig
from keras_llm.layers import CachedAttention, LogitPositions, RMSNorm, TokenEmbedding
from keras_llm.layers.activations import ACTIVATION_FUNCTIONS, gelu_tanh

# Name of the gate's activation layer of block `i` for each `mlp_activation`.
_ACTIVATION_LAYERS = {"silu": "mlp_silu", "gelu_tanh": "mlp_gelu"}

# Names of the Dense layers of block `i`, formatted with `i`.
PROJECTIONS = ("query", "key", "value", "attention_output",
               "mlp_gate", "mlp_up", "mlp_down")


def build_llama(config, name="llama", dtype=None):
    """Build the Functional model `token_ids (B, T) -> logits (B, T, V)`.

    Args:
        config: a `LlamaConfig`.
        name: model name.
        dtype: layer dtype or mixed precision policy name (None: float32).

    Returns:
        An uncompiled `keras.Model`; logits are float32.

    Example:
        >>> model = build_llama(LlamaConfig.named("tiny"))
        >>> logits = model(tf.constant([[1, 2, 3]]))  # (1, 3, 300)
    """
    c = config
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    embedding = TokenEmbedding(c.vocabulary_size, c.hidden_dim, scale=c.embedding_scale,
                               dtype=dtype, name="token_embedding")
    x = embedding(token_ids)  # (B, T, H)

    def dense(units, layer_name, use_bias=False):
        return keras.layers.Dense(units, use_bias=use_bias, dtype=dtype, name=layer_name)

    def norm(layer_name):
        return RMSNorm(c.rms_norm_epsilon, weight_offset=c.norm_weight_offset, dtype=dtype,
                       name=layer_name)

    for i in range(c.num_layers):
        p = f"layer_{i}_"
        h = norm(p + "attention_norm")(x)
        q = dense(c.num_query_heads * c.head_dim, p + "query", c.attention_bias)(h)
        k = dense(c.num_key_value_heads * c.head_dim, p + "key", c.attention_bias)(h)
        v = dense(c.num_key_value_heads * c.head_dim, p + "value", c.attention_bias)(h)
        a = CachedAttention(c.num_query_heads, c.num_key_value_heads, c.head_dim,
                            rope_theta=c.rope_theta, layer_index=i,
                            max_sequence_length=c.context_length,
                            rope_scaling=c.rope_scaling, dtype=dtype,
                            name=p + "attention")([q, k, v])
        a = dense(c.hidden_dim, p + "attention_output")(a)
        x = keras.layers.Add(dtype=dtype, name=p + "attention_residual")([x, a])

        h = norm(p + "mlp_norm")(x)
        gate = dense(c.intermediate_dim, p + "mlp_gate")(h)
        up = dense(c.intermediate_dim, p + "mlp_up")(h)
        gate = keras.layers.Activation(ACTIVATION_FUNCTIONS[c.mlp_activation], dtype=dtype,
                                       name=p + _ACTIVATION_LAYERS[c.mlp_activation])(gate)
        m = keras.layers.Multiply(dtype=dtype, name=p + "mlp_multiply")([gate, up])
        m = dense(c.hidden_dim, p + "mlp_down")(m)
        x = keras.layers.Add(dtype=dtype, name=p + "mlp_residual")([x, m])

    x = norm("final_norm")(x)
    x = LogitPositions(dtype=dtype, name="logit_positions")(x)
    if c.tie_word_embeddings:
        logits = embedding(x, reverse=True)
    else:
        logits = keras.layers.Dense(c.vocabulary_size, use_bias=False, dtype="float32",
                                    name="lm_head")(x)
    return keras.Model(token_ids, logits, name=name)


def assign_weights(model, weights, source, error=ValueError):
    """Give each named layer of `model` its arrays, after checking that every
    layer with weights gets some, no name is unknown and every shape fits
    (so a failure leaves no half-assigned model behind).

    Args:
        model: a model from `build_llama`.
        weights: `{layer name: [arrays in layer.weights order]}`.
        source: what the weights came from, for the messages.
        error: the exception class raised (a `ValueError` subclass).
    """
    expected = {layer.name: [tuple(w.shape) for w in layer.weights]
                for layer in model.layers if layer.weights}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise error(f"{source} lacks weights for layers {missing[:5]}"
                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise error(f"{source} has weights for layers the model does not have: {unknown[:5]}")
    for name, arrays in weights.items():
        shapes = [tuple(a.shape) for a in arrays]
        if shapes != expected[name]:
            raise error(f"{source}: weights for {name} have shapes {shapes}, the model "
                        f"expects {expected[name]}")
    for name, arrays in weights.items():
        model.get_layer(name).set_weights(arrays)


def unwrap(layer):
    """The layer inside TF-MOT wrappers (pruning, quantization), or itself."""
    while hasattr(layer, "layer") and isinstance(layer.layer, keras.layers.Layer):
        layer = layer.layer
    return layer


def find_layer(model, layer_name):
    """The layer named `layer_name`, looking through TF-MOT wrappers."""
    for layer in model.layers:
        if layer.name == layer_name or unwrap(layer).name == layer_name:
            return unwrap(layer)
    raise ValueError(f"model {model.name!r} has no layer {layer_name!r}")


def config_from_model(model):
    """Recover the `LlamaConfig` of a model built by `build_llama`.

    Works on models loaded from disk and on TF-MOT clones, since every
    hyperparameter lives in some layer's config.
    """
    layers = [unwrap(layer) for layer in model.layers]
    attention = [l for l in layers if isinstance(l, CachedAttention)]
    embeddings = [l for l in layers if isinstance(l, TokenEmbedding)]
    if not attention or len(embeddings) != 1:
        raise ValueError(
            f"model {model.name!r} is not a keras-llm Llama model "
            "(expected a TokenEmbedding and CachedAttention layers)"
        )
    first = attention[0]
    norm = find_layer(model, "final_norm")
    tied = not any(l.name == "lm_head" for l in layers)
    activation = next(l for l in layers if isinstance(l, keras.layers.Activation)
                      and l.name.startswith("layer_0_mlp_"))
    return LlamaConfig(
        vocabulary_size=embeddings[0].input_dim,
        hidden_dim=embeddings[0].output_dim,
        num_layers=len(attention),
        num_query_heads=first.num_query_heads,
        num_key_value_heads=first.num_key_value_heads,
        head_dim=first.head_dim,
        intermediate_dim=find_layer(model, "layer_0_mlp_gate").units,
        rope_theta=first.rope_theta,
        rms_norm_epsilon=norm.epsilon,
        context_length=first.max_sequence_length,
        tie_word_embeddings=tied,
        attention_bias=bool(getattr(find_layer(model, "layer_0_query"), "use_bias", False)),
        mlp_activation="gelu_tanh" if activation.activation is gelu_tanh else "silu",
        norm_weight_offset=norm.weight_offset,
        embedding_scale=embeddings[0].scale,
        rope_scaling=first.rope_scaling,
    )
