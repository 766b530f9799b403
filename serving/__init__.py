"""gRPC serving of keras-llm SavedModels: TF Serving's API plus streaming generation.

Imports keras_llm first so tf.keras resolves to tf_keras whatever the server imports.
"""

import keras_llm  # noqa: F401  pylint: disable=unused-import
