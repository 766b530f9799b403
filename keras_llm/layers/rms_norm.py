"""Root-mean-square layer normalization."""

import tensorflow as tf
import tf_keras as keras


@keras.saving.register_keras_serializable(package="keras_llm")
class RMSNorm(keras.layers.Layer):
    """RMSNorm: `x / sqrt(mean(x**2) + epsilon) * (weight_offset + scale)`,
    computed in float32.

    Args:
        epsilon: added to the mean square before the square root.
        weight_offset: added to the stored scale (Gemma stores `weight - 1`
            and multiplies by `1 + weight`: 1.0); 0 for Llama.

    Example:
        >>> y = RMSNorm(epsilon=1e-5)(tf.ones([2, 3, 8]))
    """

    def __init__(self, epsilon=1e-5, weight_offset=0.0, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.weight_offset = float(weight_offset)

    def effective_scale(self):
        """The per-channel factor applied, `weight_offset + scale` (float32)."""
        scale = tf.cast(self.scale, tf.float32)
        return scale + self.weight_offset if self.weight_offset else scale

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="ones",
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        x = tf.cast(inputs, tf.float32)
        variance = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
        # One product of the per-row factor and the per-channel scale: a
        # constant multiply right before a projection would be folded into
        # its weights by the LiteRT converter, undoing the SmoothQuant scales
        # that keras_llm.litert keeps in `scale`.
        x = x * (tf.math.rsqrt(variance + self.epsilon) * self.effective_scale())
        return tf.cast(x, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon,
                "weight_offset": self.weight_offset}
