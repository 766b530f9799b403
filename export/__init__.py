"""SavedModel export in TF Serving layout (`<base>/<name>/<version>/`)."""

import keras_llm  # noqa: F401  pylint: disable=unused-import  (selects tf_keras first)

from keras_llm.export.saved_model import ExportError, GenerationModule, export_model

__all__ = ["ExportError", "GenerationModule", "export_model"]
