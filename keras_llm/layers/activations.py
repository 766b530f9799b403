"""Activations of the gated MLP, registered so saved models name them."""

import tensorflow as tf
import tf_keras as keras


@keras.saving.register_keras_serializable(package="keras_llm")
def gelu_tanh(x):
    """GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`,
    Hugging Face's `gelu_pytorch_tanh`), Gemma's MLP activation."""
    return tf.nn.gelu(x, approximate=True)


# `LlamaConfig.mlp_activation` -> what `keras.layers.Activation` is given.
ACTIVATION_FUNCTIONS = {"silu": "silu", "gelu_tanh": gelu_tanh}
