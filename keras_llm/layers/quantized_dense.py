"""A Dense layer whose kernel is stored as int8 with per-channel scales."""

import tensorflow as tf
import tf_keras as keras


@keras.saving.register_keras_serializable(package="keras_llm")
class QuantizedDense(keras.layers.Layer):
    """A bias-free `Dense` with an int8 kernel and per-output-channel scales.

    `y = (x @ float(kernel)) * scale`; the int8 kernel is what is stored.

    Args:
        units: output width.
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        in_dim = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(in_dim, self.units), dtype=tf.int8,
            initializer="zeros", trainable=False)
        self.scale = self.add_weight(
            name="scale", shape=(self.units,), dtype=tf.float32,
            initializer="ones", trainable=False)
        super().build(input_shape)

    def call(self, inputs):
        kernel = tf.cast(self.kernel, self.compute_dtype)
        outputs = tf.tensordot(inputs, kernel, axes=[[-1], [0]]) \
            if inputs.shape.rank != 2 else tf.matmul(inputs, kernel)
        return outputs * tf.cast(self.scale, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def get_config(self):
        return {**super().get_config(), "units": self.units}
