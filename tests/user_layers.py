"""Three causal LMs as a user writes them: plain tf_keras, no keras-llm layers.

Importing this module registers its layers (`register_keras_serializable`),
so `keras-llm generate --custom-objects tests.user_layers` loads their files.
It also exposes them as `custom_objects`.

    mini_gpt(...)         the keras.io "text generation with a miniature GPT"
                          layers: TokenAndPositionEmbedding + TransformerBlock
                          around MultiHeadAttention (causal mask), fixed input length
    builtin_gpt(...)      the same architecture from built-in layers only
                          (Functional, any length up to its position embedding)
    small_llama(...)      a hand-written Llama: RMSNorm, rotary, grouped-query
                          attention, SwiGLU (no length limit of its own)
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

PACKAGE = "user_layers"


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenAndPositionEmbedding(layers.Layer):
    """Token plus learned position embeddings (keras.io's layer)."""

    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.maxlen, self.vocab_size, self.embed_dim = maxlen, vocab_size, embed_dim
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = tf.range(start=0, limit=tf.shape(x)[-1], delta=1)
        return self.token_emb(x) + self.pos_emb(positions)

    def get_config(self):
        return {**super().get_config(), "maxlen": self.maxlen, "vocab_size": self.vocab_size,
                "embed_dim": self.embed_dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(layers.Layer):
    """Post-norm transformer block with causal self-attention (keras.io's layer)."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim, self.rate = embed_dim, num_heads, ff_dim, rate
        self.att = layers.MultiHeadAttention(num_heads, embed_dim // num_heads)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"),
                                     layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=False):
        attention = self.att(inputs, inputs, use_causal_mask=True)
        out1 = self.layernorm1(inputs + self.dropout1(attention, training=training))
        return self.layernorm2(out1 + self.dropout2(self.ffn(out1), training=training))

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "rate": self.rate}


def mini_gpt(vocab_size=128, maxlen=64, embed_dim=32, num_heads=2, ff_dim=64, num_layers=2,
             seed=0):
    """keras.io's miniature GPT: input of a fixed `maxlen`, logits `(B, maxlen, V)`."""
    keras.utils.set_random_seed(seed)
    inputs = layers.Input(shape=(maxlen,), dtype="int32")
    x = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)(inputs)
    for _ in range(num_layers):
        x = TransformerBlock(embed_dim, num_heads, ff_dim)(x)
    return keras.Model(inputs, layers.Dense(vocab_size)(x), name="mini_gpt")


def builtin_gpt(vocab_size=128, maxlen=64, embed_dim=32, num_heads=2, ff_dim=64, num_layers=2,
                seed=0, causal=True):
    """The same GPT from built-in layers and TF ops only (Functional)."""
    keras.utils.set_random_seed(seed)
    inputs = layers.Input(shape=(None,), dtype="int32")
    positions = tf.range(tf.shape(inputs)[1])
    x = (layers.Embedding(vocab_size, embed_dim)(inputs)
         + layers.Embedding(maxlen, embed_dim, name="positions")(positions))
    for i in range(num_layers):
        attention = layers.MultiHeadAttention(num_heads, embed_dim // num_heads,
                                              name=f"attention_{i}")(x, x, use_causal_mask=causal)
        x = layers.LayerNormalization(epsilon=1e-6)(layers.Add()([x, attention]))
        hidden = layers.Dense(embed_dim)(layers.Dense(ff_dim, activation="relu")(x))
        x = layers.LayerNormalization(epsilon=1e-6)(layers.Add()([x, hidden]))
    return keras.Model(inputs, layers.Dense(vocab_size)(x), name="builtin_gpt")


@keras.saving.register_keras_serializable(package=PACKAGE)
class RMSNorm(layers.Layer):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")
        super().build(input_shape)

    def call(self, x):
        variance = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
        return x * tf.math.rsqrt(variance + self.epsilon) * self.scale

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def rotate(x, theta):
    """Rotary position embedding of `x (B, T, H, D)` (half-split layout)."""
    length, dim = tf.shape(x)[1], x.shape[-1]
    inverse = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))  # (D/2,)
    angles = tf.cast(tf.range(length), tf.float32)[:, None] * inverse[None, :]  # (T, D/2)
    cos, sin = tf.cos(angles)[None, :, None, :], tf.sin(angles)[None, :, None, :]
    first, second = x[..., :dim // 2], x[..., dim // 2:]
    return tf.concat([first * cos - second * sin, second * cos + first * sin], axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedQueryAttention(layers.Layer):
    """Causal self-attention with rotary positions and shared key/value heads."""

    def __init__(self, num_heads, num_kv_heads, head_dim, theta=10000.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.theta = head_dim, theta
        self.query = layers.Dense(num_heads * head_dim, use_bias=False)
        self.key = layers.Dense(num_kv_heads * head_dim, use_bias=False)
        self.value = layers.Dense(num_kv_heads * head_dim, use_bias=False)
        self.out = None

    def build(self, input_shape):
        self.out = layers.Dense(input_shape[-1], use_bias=False)
        super().build(input_shape)

    def call(self, x):
        batch, length = tf.shape(x)[0], tf.shape(x)[1]

        def heads(t, count):
            return tf.reshape(t, [batch, length, count, self.head_dim])  # (B, T, H, D)

        q = rotate(heads(self.query(x), self.num_heads), self.theta)
        k = rotate(heads(self.key(x), self.num_kv_heads), self.theta)
        v = heads(self.value(x), self.num_kv_heads)
        group = self.num_heads // self.num_kv_heads
        k, v = tf.repeat(k, group, axis=2), tf.repeat(v, group, axis=2)
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)  # (B, H, T, T)
        causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
        scores = tf.where(causal, scores, tf.constant(-1e9, scores.dtype))
        context = tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(scores, axis=-1), v)
        return self.out(tf.reshape(context, [batch, length, self.num_heads * self.head_dim]))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "theta": self.theta}


def small_llama(vocab_size=128, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate=64, seed=0):
    """A Llama written by hand (Functional over the layers above)."""
    keras.utils.set_random_seed(seed)
    inputs = layers.Input(shape=(None,), dtype="int32")
    x = layers.Embedding(vocab_size, hidden)(inputs)
    for _ in range(num_layers):
        attention = GroupedQueryAttention(num_heads, num_kv_heads, hidden // num_heads)(
            RMSNorm()(x))
        x = layers.Add()([x, attention])
        h = RMSNorm()(x)
        gate = layers.Activation("silu")(layers.Dense(intermediate, use_bias=False)(h))
        up = layers.Dense(intermediate, use_bias=False)(h)
        x = layers.Add()([x, layers.Dense(hidden, use_bias=False)(layers.Multiply()([gate, up]))])
    logits = layers.Dense(vocab_size, use_bias=False)(RMSNorm()(x))
    return keras.Model(inputs, logits, name="small_llama")


def greedy_predict(model, prompt, max_new_tokens, pad_to=None):
    """The user's own generation loop: `model.predict` and argmax per token.

    Args:
        model: the causal LM.
        prompt: token ids.
        max_new_tokens: tokens to generate.
        pad_to: a fixed input length to right-pad to (keras.io's mini GPT).
    """
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        ids = np.array([tokens + [0] * ((pad_to or len(tokens)) - len(tokens))], np.int32)
        logits = model.predict(ids, verbose=0)
        tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


custom_objects = {cls.__name__: cls for cls in (TokenAndPositionEmbedding, TransformerBlock,
                                                RMSNorm, GroupedQueryAttention)}
