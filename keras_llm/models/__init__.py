"""Model builders."""

from keras_llm.models.llama import assign_weights, build_llama, config_from_model, find_layer

__all__ = ["assign_weights", "build_llama", "config_from_model", "find_layer"]
