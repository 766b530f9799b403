"""The SavedModel of a user's own causal LM (the recompute path).

`RecomputeGenerationModule` is what `export_model` writes for a model that
is not a keras-llm Llama (see `keras_llm.runtime.recompute`). Its signatures
have the names, inputs and outputs of the Llama export's:

- `generate_ids`: `token_ids` `[-1, -1]` + `num_tokens` `[-1]` (prompt ids,
  right-padded) plus `max_new_tokens`, `temperature`, `top_p`, `top_k`,
  `seed` (each `[-1]`) -> `token_ids`, `num_tokens`.
- `score`: `token_ids` + `num_tokens` -> `log_probs`, `total_log_prob`.
- `serving_default` and `generate` (string prompts), only when the tokenizer
  runs in the graph (keras-llm's byte-level BPE).

The decode loop is a `tf.while_loop` over the backend's own compiled forward
pass (`recompute.last_logits`, carried as the `recompute` attribute, which
`keras-llm serve` runs too): each step runs the whole right-padded buffer,
samples with `keras_llm.samplers` and applies the shared stop/length rule
(`keras_llm.generation.account`).
"""

import logging

import tensorflow as tf

from keras_llm.export.saved_model import score_outputs
from keras_llm.generation import account, round_up
from keras_llm.samplers import sample_next

LOG = logging.getLogger("keras_llm.export")
SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


class RecomputeGenerationModule(tf.Module):
    """The object `tf.saved_model.save` writes for a user's causal LM.

    Args:
        lm: a `LanguageModel` over a user's model (`lm.generic`).
        max_new_tokens: default (and upper bound) of new tokens per request.
        tokenizer: keras-llm's in-graph `BytePairTokenizer` for the text
            signatures, or None (ids signatures only).
        litert: also convert the forward pass to LiteRT (where the model
            converts): `litert_file` is then the checked file, which the
            export carries for `keras-llm serve`.

    Raises:
        ValueError: `max_new_tokens` does not leave room for a prompt.
    """

    def __init__(self, lm, max_new_tokens=128, tokenizer=None, litert=True):
        super().__init__(name="keras_llm_recompute_generation")
        backend = lm.recompute_backend(litert=litert)
        self.recompute = backend.functions
        self.litert_file = backend.litert.path if backend.litert is not None else None
        self.litert_row_counts = list(backend.litert.row_counts) if self.litert_file else []
        self.model = backend.functions.model
        self.tokenizer = tokenizer
        self.context_length = backend.capabilities.max_length
        self.vocabulary_size = backend.capabilities.vocabulary_size
        self.length_bucket, self.fixed_length = backend.length_bucket, backend.fixed_length
        self.max_new_tokens = int(max_new_tokens)
        if not 0 < self.max_new_tokens < self.context_length:
            raise ValueError(f"max_new_tokens must be in [1, {self.context_length}), "
                             f"got {max_new_tokens}")
        host = lm.host_tokenizer
        self.pad_id = 0
        self.stop_ids = (list(host.stop_ids) if host is not None else []) or [-1]
        rows = lambda dtype, name: tf.TensorSpec([None], dtype, name=name)  # noqa: E731
        sampling = [rows(tf.int32, "max_new_tokens"), rows(tf.float32, "temperature"),
                    rows(tf.float32, "top_p"), rows(tf.int32, "top_k"), rows(tf.int32, "seed")]
        ids = [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
               rows(tf.int32, "num_tokens")]
        self.generate_ids = tf.function(self._generate_ids, input_signature=ids + sampling)
        self.score = tf.function(self._score, input_signature=ids)
        self.signature_names = ["generate_ids", "score"]
        if tokenizer is not None:
            prompt = tf.TensorSpec([None], tf.string, name="prompt")
            self.serving_default = tf.function(self._serving_default, input_signature=[prompt])
            self.generate = tf.function(self._generate_text, input_signature=[prompt] + sampling)
            self.signature_names = ["serving_default", "generate"] + self.signature_names
        else:
            LOG.info("no text signatures in the export: the tokenizer does not run in the "
                     "graph (only keras-llm's byte-level BPE does); generate_ids and score only")

    def _generate_ids(self, token_ids, num_tokens, max_new_tokens, temperature, top_p, top_k,
                      seed):
        tokens, counts = self._decode(token_ids, num_tokens, max_new_tokens, temperature, top_p,
                                      top_k, seed)
        return {"token_ids": tokens, "num_tokens": counts}

    def _decode(self, token_ids, num_tokens, max_new_tokens, temperature, top_p, top_k, seed):
        """Generate for right-padded prompts `(B, P)`; returns `(tokens
        (B, N) padded with the pad id, counts (B,))`."""
        batch = tf.shape(token_ids)[0]
        lengths = tf.cast(num_tokens, tf.int32)
        rows = lambda x, dtype: tf.cast(tf.broadcast_to(x, [batch]), dtype)  # noqa: E731
        max_new = rows(tf.clip_by_value(max_new_tokens, 0, self.max_new_tokens), tf.int32)
        temperature, top_p = rows(temperature, tf.float32), rows(top_p, tf.float32)
        top_k, seed = rows(top_k, tf.int32), rows(seed, tf.int32)
        most_new = tf.maximum(tf.reduce_max(max_new), 1)
        longest = tf.reduce_max(lengths)
        checks = [
            tf.debugging.assert_positive(lengths, message="empty prompt"),
            tf.debugging.assert_less_equal(
                longest + most_new, self.context_length,
                message=f"prompt plus max_new_tokens exceeds the model's limit of "
                        f"{self.context_length} positions"),
            tf.debugging.assert_less(tf.reduce_max(token_ids), self.vocabulary_size,
                                     message="token id out of range"),
            tf.debugging.assert_non_negative(token_ids, message="negative token id"),
        ]
        with tf.control_dependencies(checks):
            width = (tf.constant(self.fixed_length) if self.fixed_length else
                     tf.minimum(round_up(longest + most_new, self.length_bucket),
                                self.context_length))
        source = tf.pad(token_ids, [[0, 0], [0, width]])[:, :width]  # (B, W), right-padded
        valid = tf.range(width)[tf.newaxis, :] < lengths[:, tf.newaxis]
        ids = tf.where(valid, source, self.pad_id)
        stop_ids = tf.constant(self.stop_ids, tf.int32)
        finished = max_new <= 0
        row = tf.range(batch)

        def cond(i, ids, done, counts, out):
            del ids, counts, out
            return (i < most_new) & ~tf.reduce_all(done)

        def body(i, ids, done, counts, out):
            position = lengths + i  # (B,) where this step's token goes
            _, logits = self.recompute.last_logits(ids, position - 1)  # (B, V)
            token = sample_next(logits, temperature, top_k, top_p, seed, i)
            token, done, counts = account(token, done, counts, finished, stop_ids, max_new, i,
                                          self.pad_id)
            ids = tf.tensor_scatter_nd_update(ids, tf.stack([row, position], axis=1), token)
            column = tf.fill([batch], i)
            out = tf.tensor_scatter_nd_update(out, tf.stack([row, column], axis=1), token)
            return i + 1, ids, done, counts, out

        out = tf.fill([batch, most_new], self.pad_id)
        _, _, _, counts, out = tf.while_loop(
            cond, body, (tf.constant(0), ids, tf.zeros([batch], tf.bool),
                         tf.zeros([batch], tf.int32), out))
        keep = tf.range(most_new)[tf.newaxis, :] < counts[:, tf.newaxis]
        return tf.where(keep, out, self.pad_id), counts

    def _score(self, token_ids, num_tokens):
        return score_outputs(self.model, token_ids, num_tokens, self.pad_id)

    # ----- text signatures (in-graph tokenizer only) -------------------------

    def _text(self, prompt, max_new_tokens, temperature, top_p, top_k, seed):
        ragged = tf.cast(self.tokenizer.tokenize(prompt), tf.int32)  # (B, None)
        tokens, counts = self._decode(ragged.to_tensor(self.pad_id),
                                      tf.cast(ragged.row_lengths(), tf.int32), max_new_tokens,
                                      temperature, top_p, top_k, seed)
        text = self.tokenizer.detokenize(tf.RaggedTensor.from_tensor(tokens, lengths=counts))
        return {"text": text, "token_ids": tokens, "num_tokens": counts}

    def _serving_default(self, prompt):
        batch = tf.shape(prompt)[0]
        return self._text(prompt, tf.fill([batch], self.max_new_tokens), tf.zeros([batch]),
                          tf.ones([batch]), tf.zeros([batch], tf.int32),
                          tf.zeros([batch], tf.int32))

    def _generate_text(self, prompt, max_new_tokens, temperature, top_p, top_k, seed):
        return self._text(prompt, max_new_tokens, temperature, top_p, top_k, seed)

    def metadata(self):
        """What `keras-llm serve` needs to run this export (merged into
        `assets/keras_llm.json`)."""
        return {
            "architecture": "user",
            "backend": "recompute",
            "config": {"vocabulary_size": self.vocabulary_size,
                       "context_length": self.context_length,
                       "length_bucket": self.length_bucket,
                       "fixed_length": self.fixed_length},
            "dtype": str(self.model.compute_dtype or "float32"),
            "context_length": self.context_length,
            "max_new_tokens": self.max_new_tokens,
            "xla": bool(self.recompute.jit_compile),
            "signatures": list(self.signature_names),
            "engine_functions": ["recompute.last_logits"],
            "chat_applied_in_graph": False,
        }
