"""Select Keras 2 (`tf_keras`) before TensorFlow resolves `tf.keras`.

TF-MOT only works with Keras 2 models, so keras-llm pins `tf.keras` to
`tf_keras` through `TF_USE_LEGACY_KERAS=1`. TensorFlow reads the variable the
first time `tf.keras` is touched, so importing `tensorflow` before
`keras_llm` is fine; touching `tf.keras` before it is not, and is reported.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def check_legacy_keras():
    """Raise ImportError if `tf.keras` already resolved to Keras 3."""
    if os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):
        raise ImportError(
            "keras_llm needs Keras 2: unset TF_USE_LEGACY_KERAS or set it to 1 "
            f"(it is {os.environ.get('TF_USE_LEGACY_KERAS')!r})."
        )
    tf = sys.modules.get("tensorflow")
    keras_mod = getattr(tf, "keras", None) if tf is not None else None
    name = getattr(keras_mod, "__name__", "")
    if name and not name.startswith("tf_keras"):
        raise ImportError(
            "tf.keras was resolved to Keras 3 before keras_llm was imported. "
            "Import keras_llm before touching tf.keras, or set "
            "TF_USE_LEGACY_KERAS=1 in the environment."
        )
