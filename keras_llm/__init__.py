"""keras-llm: fast Keras language models, optimized, exported and served.

Importing `keras_llm` selects Keras 2 (`tf_keras`) for `tf.keras` and
registers its layers, so `tf.keras.models.load_model` reads keras-llm files
without `custom_objects`.

Example:
    >>> import keras_llm
    >>> lm = keras_llm.load("smollm2")
    >>> print(lm.generate("What is 2+2?", chat=True).text)
"""

from keras_llm import _env

_env.check_legacy_keras()

# pylint: disable=wrong-import-position
from keras_llm.config import LlamaConfig
from keras_llm.generation import Generator, SamplingParams
from keras_llm.language_model import Completion, LanguageModel, load
from keras_llm.layers import CachedAttention, LogitPositions, RMSNorm, TokenEmbedding
from keras_llm.models import build_llama
from keras_llm.saving import load_model

__version__ = "0.1.0"

__all__ = [
    "CachedAttention",
    "Completion",
    "Generator",
    "LanguageModel",
    "LlamaConfig",
    "LogitPositions",
    "RMSNorm",
    "SamplingParams",
    "TokenEmbedding",
    "build_llama",
    "load",
    "load_model",
]
