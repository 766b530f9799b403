"""Token embedding that can also act as the tied output head."""

import tensorflow as tf
import tf_keras as keras


@keras.saving.register_keras_serializable(package="keras_llm")
class TokenEmbedding(keras.layers.Embedding):
    """An `Embedding` whose matrix doubles as the output projection.

    `layer(ids)` looks tokens up; `layer(hidden, reverse=True)` returns
    float32 logits `hidden @ embeddings^T`, so a tied head owns no second copy
    of the weights.

    Args:
        input_dim: vocabulary size.
        output_dim: embedding width.
        scale: factor on looked-up embeddings (Gemma: `sqrt(output_dim)`),
            or None; the reverse (output head) product is never scaled.
        **kwargs: passed on to `keras.layers.Embedding`.

    Example:
        >>> emb = TokenEmbedding(100, 8)
        >>> logits = emb(emb(tf.constant([[1, 2]])), reverse=True)  # (1, 2, 100)
    """

    def __init__(self, input_dim, output_dim, scale=None, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.scale = None if scale is None else float(scale)

    def call(self, inputs, reverse=False):
        if not reverse:
            embedded = super().call(inputs)
            if self.scale is None:
                return embedded
            return embedded * tf.cast(self.scale, embedded.dtype)
        hidden = tf.cast(inputs, tf.float32)
        table = tf.cast(self.embeddings, tf.float32)
        batch, length = tf.shape(hidden)[0], tf.shape(hidden)[1]
        flat = tf.reshape(hidden, [-1, self.output_dim])  # (B*T, H)
        logits = tf.matmul(flat, table, transpose_b=True)  # (B*T, V), no transposed copy
        return tf.reshape(logits, [batch, length, self.input_dim])

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        if self.scale is not None:  # absent for unscaled tables, as before
            config["scale"] = self.scale
        return config
