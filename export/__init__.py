"""SavedModel export in TF Serving layout (`<base>/<name>/<version>/`).

Built on `keras_llm`'s model and generation functions; see the project's
issue tracker for the export work in progress.
"""
