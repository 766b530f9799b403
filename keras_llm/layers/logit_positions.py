"""Chooses which positions reach the output head."""

import tf_keras as keras

from keras_llm.layers.kv_cache import current_cache_context


@keras.saving.register_keras_serializable(package="keras_llm")
class LogitPositions(keras.layers.Layer):
    """Identity, except during cached generation where only the last
    position needs logits: then it keeps `(B, 1, H)` of `(B, T, H)`.

    Saves the output head's work on every prompt position but the last
    during prefill (rows are left-padded, so the last position is real).
    """

    def call(self, inputs):
        context = current_cache_context()
        if context is not None and context.last_position_only:
            return inputs[:, -1:, :]
        return inputs
