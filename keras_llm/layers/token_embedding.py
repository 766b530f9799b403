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
        **kwargs: passed on to `keras.layers.Embedding`.

    Example:
        >>> emb = TokenEmbedding(100, 8)
        >>> logits = emb(emb(tf.constant([[1, 2]])), reverse=True)  # (1, 2, 100)
    """

    def call(self, inputs, reverse=False):
        if not reverse:
            return super().call(inputs)
        hidden = tf.cast(inputs, tf.float32)
        table = tf.cast(self.embeddings, tf.float32)
        batch, length = tf.shape(hidden)[0], tf.shape(hidden)[1]
        flat = tf.reshape(hidden, [-1, self.output_dim])  # (B*T, H)
        logits = tf.matmul(flat, table, transpose_b=True)  # (B*T, V), no transposed copy
        return tf.reshape(logits, [batch, length, self.input_dim])

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(input_shape)
