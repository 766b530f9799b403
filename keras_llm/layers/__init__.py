"""Layers of keras-llm models. All are registered for `load_model`."""

from keras_llm.layers.attention import CachedAttention
from keras_llm.layers.kv_cache import KVCacheContext, current_cache_context
from keras_llm.layers.logit_positions import LogitPositions
from keras_llm.layers.quantized_dense import QuantizedDense
from keras_llm.layers.rms_norm import RMSNorm
from keras_llm.layers.token_embedding import TokenEmbedding

__all__ = [
    "CachedAttention",
    "KVCacheContext",
    "LogitPositions",
    "QuantizedDense",
    "RMSNorm",
    "TokenEmbedding",
    "current_cache_context",
]
