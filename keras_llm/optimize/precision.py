"""16-bit weights and compute for inference (float16 or bfloat16).

`cast_model` rebuilds the model with `build_llama(config, dtype=...)`: every
layer then holds 16-bit variables and computes in 16 bits, so no float32 copy
of the weights is made per call (unlike the `mixed_*` policies, which keep
float32 variables). What stays float32 is decided by the layers themselves:
`RMSNorm` normalizes in float32, `CachedAttention` computes scores and
softmax in float32, and the tied output head (`TokenEmbedding(reverse=True)`)
returns float32 logits, as does generation's sampling. The KV cache takes the
projections' 16-bit dtype.

Example:
    >>> half = cast_model(model, "bfloat16")
"""

import numpy as np
import tf_keras as keras

from keras_llm.models import build_llama, config_from_model

DTYPES = ("float16", "bfloat16")


def cast_model(model, dtype):
    """A copy of a float keras-llm model with `dtype` weights and compute.

    Args:
        model: a keras-llm model with float weights (not QuantizedDense).
        dtype: "float16" or "bfloat16".
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    cast = build_llama(config_from_model(model), name=model.name, dtype=dtype)
    source = {layer.name: layer for layer in model.layers}
    for layer in cast.layers:
        if not layer.weights:
            continue
        weights = source[layer.name].get_weights()
        for value in weights:
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                raise ValueError(f"layer {layer.name!r} holds {np.asarray(value).dtype} "
                                 "weights; cast a float model")
        layer.set_weights([np.asarray(w, np.float32).astype(v.dtype.as_numpy_dtype)
                           for w, v in zip(weights, layer.weights)])
    return cast


def model_dtype(model):
    """The variable dtype of the projections ("float32", "bfloat16", "int8", ...)."""
    layer = next(l for l in model.layers if l.name == "layer_0_query")
    return layer.weights[0].dtype.name if layer.weights else keras.backend.floatx()
