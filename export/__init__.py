"""SavedModel export in TF Serving layout (`<base>/<name>/<version>/`)."""

from export.saved_model import ExportError, GenerationModule, export_model

__all__ = ["ExportError", "GenerationModule", "export_model"]
