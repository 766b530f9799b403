"""Run an exported SavedModel with only TensorFlow and tensorflow-text.

Used by the export tests in a fresh process, the way a TF Serving client
environment would load it: keras_llm is never imported here.

    python tests/saved_model_runner.py EXPORT_DIR SIGNATURE JSON_INPUTS
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401  pylint: disable=unused-import  (registers the ops)


def main():
    path, signature, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    loaded = tf.saved_model.load(path)
    spec = loaded.signatures[signature].structured_input_signature[1]
    inputs = {k: tf.constant(np.array(v, dtype=spec[k].dtype.as_numpy_dtype))
              for k, v in json.loads(raw).items()}
    outputs = loaded.signatures[signature](**inputs)
    result = {}
    for key, value in outputs.items():
        value = value.numpy()
        if value.dtype == object:
            value = [v.decode("utf-8", errors="replace") for v in value.tolist()]
        else:
            value = value.tolist()
        result[key] = value
    result["imported_modules"] = sorted(m for m in sys.modules if m.startswith("keras_llm"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
