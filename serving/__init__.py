"""gRPC serving of keras-llm SavedModels (TF Serving API plus streaming).

Loads what `export` writes; see the project's issue tracker for the serving
work in progress.
"""
