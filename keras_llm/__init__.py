"""keras-llm: fast Keras language models, optimized, exported and served.

Importing `keras_llm` is cheap: it sets `TF_USE_LEGACY_KERAS=1` (Keras 2,
which TF-MOT needs) and imports nothing else. The names below load their
modules on first use, so a program that only generates on the LiteRT path
never imports TensorFlow. Anything that touches Keras (`load_model`, the
layers, `lm.model`) registers keras-llm's layers with `tf.keras`, so
`tf.keras.models.load_model` then reads keras-llm files without
`custom_objects`; when TensorFlow is already imported, importing
`keras_llm` registers them at once.

Example:
    >>> import keras_llm
    >>> lm = keras_llm.load("smollm2")
    >>> print(lm.generate("What is 2+2?", chat=True).text)
"""

import importlib
import sys

from keras_llm import _env

_env.check_legacy_keras()

__version__ = "0.1.0"

_EXPORTS = {
    "CachedAttention": "keras_llm.layers",
    "Completion": "keras_llm.language_model",
    "Engine": "keras_llm.runtime.engine",
    "LanguageModel": "keras_llm.language_model",
    "LlamaConfig": "keras_llm.config",
    "LogitPositions": "keras_llm.layers",
    "RMSNorm": "keras_llm.layers",
    "SamplingParams": "keras_llm.runtime.params",
    "TokenEmbedding": "keras_llm.layers",
    "build_llama": "keras_llm.models",
    "load": "keras_llm.language_model",
    "load_model": "keras_llm.saving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


if "tensorflow" in sys.modules:  # the user works with tf.keras: register the layers now
    importlib.import_module("keras_llm.layers")
