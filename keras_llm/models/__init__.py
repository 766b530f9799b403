"""Model builders."""

from keras_llm.models.llama import build_llama, config_from_model, find_layer

__all__ = ["build_llama", "config_from_model", "find_layer"]
