"""Export a keras-llm model as a SavedModel in TF Serving layout.

`export_model` writes `<model_base_path>/<model_name>/<version>/` with:

- `serving_default`: `prompt` (string `[-1]`) -> `text` (string `[-1]`),
  `token_ids` (int32 `[-1, -1]`, padded with the pad id), `num_tokens`
  (int32 `[-1]`); greedy, with the max new tokens and stop ids set at export.
- `generate`: the same plus per-row `max_new_tokens`, `temperature`,
  `top_p`, `top_k` and `seed`.
- `generate_ids`: `token_ids` `[-1, -1]` + `num_tokens` `[-1]` (prompt ids,
  right-padded) plus the sampling inputs -> `token_ids`, `num_tokens`.
- `score`: `token_ids` + `num_tokens` -> `log_probs` `[-1, -1]` (position t
  holds log p(token t | tokens before it); 0 at position 0 and in padding)
  and `total_log_prob` `[-1]`.

Besides the signatures, the SavedModel carries `engine`, a `SlotDecoder`
(`allocate`, `prefill`, `decode` tf.functions over a KV cache kept in
variables between calls): the XLA backend of keras-llm's serving engine. By
default the export also holds the model converted to LiteRT
(`assets.extra/litert/model.tflite`, float32, or int8 for an int8-quantized
model), which `keras-llm serve` decodes with; `litert=None` leaves it out.

Tokenization, the whole decode loop and detokenization are TensorFlow and
tensorflow-text ops traced from keras-llm's own model and `Generator`, so
`tensorflow_model_server` (which links TF Text ops) can run them. The decode
loop is XLA-compiled unless exported with `jit_compile=False`.

Beside the SavedModel files: `assets/keras_llm.json` (metadata) and
`assets.extra/tf_serving_warmup_requests` (warm-up `PredictionLog`s). Beside
the version directories: `batching_parameters.pbtxt` and `models.config`
examples for TF Serving.
"""

import json
import logging
import os
import shutil
import sys
import time
import uuid

import numpy as np
import tensorflow as tf

import keras_llm
from keras_llm.generation import Generator, round_up
from keras_llm.models import find_layer
from keras_llm.runtime import artifacts
from keras_llm.runtime.tokenizer import TOKENIZER_FILE
from keras_llm.runtime.xla import SlotDecoder, Untracked

LOG = logging.getLogger("keras_llm.export")
SIGNATURES = ("serving_default", "generate", "generate_ids", "score")
METADATA_ASSET = "keras_llm.json"
WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_PROMPTS = ("Hello!", "The capital of France is")
# Stands for the user's message when the chat template is rendered at export.
CHAT_SENTINEL = "\uE000keras-llm-user-message\uE001"


class ExportError(ValueError):
    """Bad export arguments; nothing was written."""


class GenerationModule(tf.Module):
    """The object `tf.saved_model.save` writes: model, tokenizer, signatures.

    Args:
        lm: a `keras_llm.LanguageModel`.
        max_new_tokens: default (and upper bound) of new tokens per request.
        jit_compile: XLA-compile the generation loop.
        chat: wrap string prompts in the model's chat template in the graph
            (one user turn; see `chat_affixes`).
        prompt_bucket, cache_bucket: shape buckets, as in `Generator`.
    """

    def __init__(self, lm, max_new_tokens=128, jit_compile=True, chat=False,
                 prompt_bucket=64, cache_bucket=256):
        super().__init__(name="keras_llm_generation")
        self._model = Untracked(lm.model)  # the variables are enough (see Untracked)
        self.weights = list(lm.model.weights)
        self.tokenizer = lm.tokenizer
        config = lm.config
        self._context = config.context_length
        self._vocabulary_size = config.vocabulary_size
        self._max_new = int(max_new_tokens)
        if not 0 < self._max_new < self._context:
            raise ExportError(f"max_new_tokens must be in [1, {self._context}), got {max_new_tokens}")
        self._pad = lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else 0
        self._stop_ids = list(lm.tokenizer.stop_ids) or [-1]
        self._prompt_bucket = int(prompt_bucket)
        self._cache_bucket = int(cache_bucket)
        self._chat = chat_affixes(lm.tokenizer) if chat else None
        self._generator = Generator(lm.model, pad_id=self._pad, prompt_bucket=prompt_bucket,
                                    cache_bucket=cache_bucket, jit_compile=jit_compile)
        self._core = tf.function(self._generate_core, jit_compile=jit_compile)
        # For keras-llm's own serving engine (not a signature: it is stateful).
        self.engine = SlotDecoder(lm.model, jit_compile=jit_compile)
        string_batch = tf.TensorSpec([None], tf.string, name="prompt")
        sampling = dict(
            max_new_tokens=tf.TensorSpec([None], tf.int32, name="max_new_tokens"),
            temperature=tf.TensorSpec([None], tf.float32, name="temperature"),
            top_p=tf.TensorSpec([None], tf.float32, name="top_p"),
            top_k=tf.TensorSpec([None], tf.int32, name="top_k"),
            seed=tf.TensorSpec([None], tf.int32, name="seed"),
        )
        ids_spec = dict(token_ids=tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                        num_tokens=tf.TensorSpec([None], tf.int32, name="num_tokens"))
        self.serving_default = tf.function(self._serving_default, input_signature=[string_batch])
        self.generate = tf.function(self._generate_text,
                                    input_signature=[string_batch, *sampling.values()])
        self.generate_ids = tf.function(self._generate_ids,
                                        input_signature=[*ids_spec.values(), *sampling.values()])
        self.score = tf.function(self._score, input_signature=list(ids_spec.values()))

    # ----- graph pieces ----------------------------------------------------

    def _prompts_to_ids(self, prompt):
        if self._chat:
            prefix, suffix = self._chat
            prompt = tf.strings.join([prefix, prompt, suffix])
        return self.tokenizer.tokenize(prompt)  # ragged (B, None)

    def _generate_core(self, prompt_ids, key_start, cache_slots, out_slots, max_new_tokens,
                       temperature, top_k, top_p, seeds):
        """Prefill and the whole decode loop, one compiled program."""
        gen = self._generator
        stop_ids = tf.constant(self._stop_ids, tf.int32)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                        stop_ids=stop_ids, max_new_tokens=max_new_tokens)
        token, caches, done, lengths = gen._prefill(  # pylint: disable=protected-access
            prompt_ids, key_start, cache_slots, **sampling)
        longest = tf.reduce_max(max_new_tokens)
        out, _, _, _, _, lengths = gen._decode(  # pylint: disable=protected-access
            token, caches, done, lengths, tf.constant(1), longest - 1,
            tf.shape(prompt_ids)[1], key_start, out_slots, **sampling)
        tokens = tf.concat([token[:, tf.newaxis], out], axis=1)
        return tokens, lengths

    def _generate_ragged(self, ragged_ids, max_new_tokens, temperature, top_k, top_p, seed):
        ragged_ids = tf.cast(ragged_ids, tf.int32)
        lengths = tf.cast(ragged_ids.row_lengths(), tf.int32)
        batch = tf.shape(lengths)[0]
        longest = tf.reduce_max(lengths)
        max_new_tokens = tf.clip_by_value(max_new_tokens, 0, self._max_new)
        most_new = tf.maximum(tf.reduce_max(max_new_tokens), 1)
        checks = [
            tf.debugging.assert_positive(lengths, message="empty prompt"),
            tf.debugging.assert_less_equal(
                longest + most_new, self._context,
                message=f"prompt plus max_new_tokens exceeds the context length {self._context}"),
            tf.debugging.assert_less(
                tf.reduce_max(ragged_ids.flat_values), self._vocabulary_size,
                message="token id out of range"),
            tf.debugging.assert_non_negative(ragged_ids.flat_values, message="negative token id"),
        ]
        with tf.control_dependencies(checks):
            prompt_length = tf.minimum(round_up(longest, self._prompt_bucket), self._context)
            cache_length = tf.minimum(round_up(prompt_length + most_new, self._cache_bucket),
                                      self._context)
            # Near the context limit the bucket may not fit: use the exact length.
            prompt_length = tf.where(cache_length < prompt_length + most_new, longest, prompt_length)
            cache_length = tf.where(cache_length < prompt_length + most_new, self._context,
                                    cache_length)
        # Left-pad: row b's tokens end at column prompt_length - 1.
        dense = ragged_ids.to_tensor(default_value=self._pad)  # (B, longest)
        key_start = prompt_length - lengths
        source = tf.range(prompt_length)[tf.newaxis, :] - key_start[:, tf.newaxis]
        ids = tf.gather(dense, tf.clip_by_value(source, 0, longest - 1), batch_dims=1)
        ids = tf.where(source >= 0, ids, self._pad)
        ones = lambda x, dtype: tf.cast(tf.broadcast_to(x, [batch]), dtype)  # noqa: E731
        tokens, counts = self._core(
            ids, key_start, tf.zeros([cache_length], tf.int8),
            tf.zeros([cache_length - prompt_length], tf.int8),
            ones(max_new_tokens, tf.int32), ones(temperature, tf.float32),
            ones(top_k, tf.int32), ones(top_p, tf.float32), ones(seed, tf.int32))
        tokens = tokens[:, :most_new]
        keep = tf.range(most_new)[tf.newaxis, :] < counts[:, tf.newaxis]
        tokens = tf.where(keep, tokens, self._pad)
        return tokens, counts

    def _text_outputs(self, tokens, counts):
        ragged = tf.RaggedTensor.from_tensor(tokens, lengths=counts)
        text = self.tokenizer.detokenize(ragged)
        return {"text": text, "token_ids": tokens, "num_tokens": counts}

    def _serving_default(self, prompt):
        batch = tf.shape(prompt)[0]
        tokens, counts = self._generate_ragged(
            self._prompts_to_ids(prompt), tf.fill([batch], self._max_new),
            tf.zeros([batch]), tf.zeros([batch], tf.int32), tf.ones([batch]),
            tf.zeros([batch], tf.int32))
        return self._text_outputs(tokens, counts)

    def _generate_text(self, prompt, max_new_tokens, temperature, top_p, top_k, seed):
        tokens, counts = self._generate_ragged(self._prompts_to_ids(prompt), max_new_tokens,
                                               temperature, top_k, top_p, seed)
        return self._text_outputs(tokens, counts)

    def _generate_ids(self, token_ids, num_tokens, max_new_tokens, temperature, top_p, top_k,
                      seed):
        ragged = tf.RaggedTensor.from_tensor(token_ids, lengths=num_tokens)
        tokens, counts = self._generate_ragged(ragged, max_new_tokens, temperature, top_k,
                                               top_p, seed)
        return {"token_ids": tokens, "num_tokens": counts}

    def _score(self, token_ids, num_tokens):
        return score_outputs(self._model.value, token_ids, num_tokens, self._pad)


def score_outputs(model, token_ids, num_tokens, pad_id):
    """The `score` signature's outputs: `log_probs (B, T)` (position t holds
    log p(token t | tokens before it); 0 at position 0 and in padding) and
    `total_log_prob (B,)`, from one forward pass of the causal `model`."""
    # Right padding is harmless here: attention is causal, so padding after a
    # row's tokens cannot change the logits of the tokens before it.
    length = tf.shape(token_ids)[1]
    valid = tf.range(length)[tf.newaxis, :] < num_tokens[:, tf.newaxis]
    ids = tf.where(valid, token_ids, pad_id)
    logits = tf.cast(model(ids, training=False), tf.float32)  # (B, T, V)
    log_probs = tf.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = tf.gather(log_probs, ids[:, 1:], batch_dims=2)  # (B, T-1)
    picked = tf.concat([tf.zeros_like(picked[:, :1]), picked], axis=1)
    picked = tf.where(valid, picked, 0.0)
    return {"log_probs": picked, "total_log_prob": tf.reduce_sum(picked, axis=1)}


def chat_affixes(tokenizer):
    """The text the model's chat template puts before and after one user
    message (with the generation prompt), for the graph to join around a
    string prompt: the template rendered once with a sentinel message and
    split there. So a prompt gets the ids `tokenizer.apply_chat_template`
    and `encode` give on the host, unless the template changes the message
    text itself (e.g. trims it).

    Raises:
        ExportError: the rendering does not hold the message exactly once.
    """
    try:
        text = tokenizer.apply_chat_template(CHAT_SENTINEL)
    except ValueError as error:
        raise ExportError(f"cannot export with --chat: {error}") from None
    parts = text.split(CHAT_SENTINEL)
    if len(parts) != 2:
        raise ExportError("cannot export with --chat: the model's chat template shows a user "
                          f"message {len(parts) - 1} times instead of once")
    return parts[0], parts[1]


def next_version(model_dir):
    versions = [int(n) for n in os.listdir(model_dir) if n.isdigit()] if os.path.isdir(model_dir) else []
    return max(versions, default=0) + 1


def remove_stale_staging(model_dir):
    """Remove `.staging-PID-*` directories left by exports whose process is
    gone (killed before it could clean up; an exception or Ctrl-C cleans up
    at once)."""
    if not os.path.isdir(model_dir):
        return
    for name in os.listdir(model_dir):
        parts = name.split("-")
        if not name.startswith(".staging-") or len(parts) < 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True  # another user's process
        if not alive:
            shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


def export_model(model, model_base_path, model_name, version=None, max_new_tokens=128,
                 jit_compile=True, chat=False, safe_mode=True, warmup=True, progress=True,
                 litert="auto", litert_batch_sizes=None, litert_max_length=None,
                 litert_lengths=None):
    """Write a SavedModel for TF Serving; see the module docstring.

    Args:
        model: a `LanguageModel`, or anything `keras_llm.load` accepts.
        model_base_path: the base directory (`--model_base_path`).
        model_name: the model's name (`--model_name`).
        version: version number; the next free one by default. An existing
            version is an error: exports never overwrite.
        max_new_tokens: default and upper bound of new tokens.
        jit_compile: XLA-compile the decode loop (TF Serving then needs
            `--xla_cpu_compilation_enabled`).
        chat: apply the chat template to string prompts inside the graph.
        safe_mode: as in `keras_llm.load`.
        warmup: write `assets.extra/tf_serving_warmup_requests`.
        litert: also write `assets.extra/litert/model.tflite`, the same model
            converted for keras-llm's server (see `keras_llm.litert`):
            "auto" (int8 or int4 for a model quantized so, else float32),
            "float32", "float16", "int8", "int4", or None for none. TF Serving
            ignores it.
        litert_batch_sizes: decode batch sizes of that file (its largest is
            the server's slot count).
        litert_max_length: cache positions per sequence in that file.
        litert_lengths: shorter caches to compile decode steps for too (the
            server moves a batch to the next length as it grows).
            The three default to `keras_llm.runtime.artifacts.DEFAULT_LITERT`,
            the layout the model's own LiteRT file has, which the export
            then copies instead of converting again.

    Returns:
        The version directory written.
    """
    if not model_name or os.sep in model_name or model_name.startswith("."):
        raise ExportError(f"bad model name {model_name!r}")
    if version is not None and (not isinstance(version, int) or version <= 0):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    base = os.path.abspath(os.fspath(model_base_path))
    model_dir = os.path.join(base, model_name)
    created = not os.path.exists(model_dir)  # removed again if this export fails
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create {model_dir}: {error.strerror or error}") from None
    try:
        return _export_version(model, base, model_dir, model_name, version, max_new_tokens,
                               jit_compile, chat, safe_mode, warmup, progress, litert,
                               litert_batch_sizes, litert_max_length, litert_lengths)
    except BaseException:
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise


def _export_version(model, base, model_dir, model_name, version, max_new_tokens, jit_compile,
                    chat, safe_mode, warmup, progress, litert, litert_batch_sizes,
                    litert_max_length, litert_lengths):
    """`export_model` once `model_dir` exists."""
    if not os.access(model_dir, os.W_OK):
        raise ExportError(f"{model_dir} is not writable")
    version = next_version(model_dir) if version is None else version
    target = os.path.join(model_dir, str(version))
    if os.path.exists(target):
        raise ExportError(f"version {version} already exists at {target}; exports never overwrite")
    lm = model if isinstance(model, keras_llm.LanguageModel) else keras_llm.load(
        model, safe_mode=safe_mode, progress=progress)
    if getattr(lm, "generic", False):
        if chat:
            raise ExportError("--chat needs the tokenizer in the graph; a user's model exports "
                              "ids signatures (apply the chat template on the client)")
        if litert not in (None, "auto", "float32"):
            raise ExportError(f"--litert {litert}: a user's model exports its forward pass in "
                              "float32 only (quantized LiteRT needs keras-llm's Llama)")
    litert_optional = litert == "auto"
    if litert_optional:
        litert = artifacts.precision_of(lm.metadata)  # None for 16-bit models: XLA serves them

    start = time.perf_counter()
    remove_stale_staging(model_dir)
    staging = os.path.join(model_dir, f".staging-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        if getattr(lm, "generic", False):
            _save_recompute(lm, staging, model_name, max_new_tokens, warmup,
                            litert=litert is not None)
        else:
            _save_llama(lm, staging, model_name, max_new_tokens, jit_compile, chat, warmup,
                        litert, litert_optional, litert_batch_sizes, litert_max_length,
                        litert_lengths, progress)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_serving_configs(base, model_name, jit_compile)
    if progress:
        print(f"exported {model_name} version {version} to {target} "
              f"in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return target


def _save_recompute(lm, staging, model_name, max_new_tokens, warmup, litert=True):
    """Write the SavedModel of a user's causal LM (see `export.recompute`)
    and, with `litert`, the LiteRT file it decodes with for `keras-llm
    serve` (see `_copy_user_litert`)."""
    from keras_llm.export.recompute import RecomputeGenerationModule  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime import user_tokenizer  # pylint: disable=import-outside-toplevel

    path = getattr(lm, "tokenizer_file", None)
    in_graph = None
    if path and user_tokenizer.tokenizer_format(path) == "keras_llm":
        from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel
        in_graph = BytePairTokenizer.from_config_file(path)
    from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
    # With a LiteRT file holding its KV cache, the recompute pass needs none of its own.
    cached = litert and isinstance(lm.engine.backend, LiteRTBackend)
    try:
        module = RecomputeGenerationModule(lm, max_new_tokens=max_new_tokens, tokenizer=in_graph,
                                           litert=litert and not cached)
    except ValueError as error:
        raise ExportError(str(error)) from None
    signatures = {name: getattr(module, name).get_concrete_function()
                  for name in module.signature_names}
    tf.saved_model.save(module, staging, signatures=signatures)
    host = lm.host_tokenizer
    tokenizer_json = None
    if path:
        with open(path, encoding="utf-8") as handle:
            tokenizer_json = handle.read()
    elif host is not None and callable(getattr(host, "to_json", None)):
        tokenizer_json = host.to_json()
    metadata = {
        "keras_llm_version": keras_llm.__version__,
        "tensorflow_version": tf.__version__,
        "source": lm.metadata.get("source"),
        **module.metadata(),
        "tokenizer": {"type": (user_tokenizer.tokenizer_format(path) if path else
                               "huggingface" if tokenizer_json else None),
                      "vocabulary_size": host.vocabulary_size if host is not None else None,
                      "bos_id": host.bos_id if host is not None else None,
                      "eos_id": host.eos_id if host is not None else None,
                      "pad_id": module.pad_id, "stop_ids": module.stop_ids},
        "chat_template": host.chat_template if host is not None else None,
    }
    if tokenizer_json is None:
        LOG.info("the export has no tokenizer (ids only)")
    if litert:
        metadata["litert"] = _copy_user_litert(lm, module, staging)
    assets = os.path.join(staging, "assets")
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, METADATA_ASSET), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2, ensure_ascii=False)
    if tokenizer_json is not None:
        with open(os.path.join(assets, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
    if warmup:
        write_warmup(os.path.join(staging, "assets.extra", WARMUP_FILE), model_name,
                     module.signature_names)


def _save_llama(lm, staging, model_name, max_new_tokens, jit_compile, chat, warmup, litert,
                litert_optional, litert_batch_sizes, litert_max_length, litert_lengths, progress=False):
    """Write the SavedModel of a keras-llm Llama (see the module docstring)."""
    module = GenerationModule(lm, max_new_tokens=max_new_tokens, jit_compile=jit_compile,
                              chat=chat)
    signatures = {name: getattr(module, name).get_concrete_function()
                  for name in SIGNATURES}
    tf.saved_model.save(module, staging, signatures=signatures)
    metadata = {
        "keras_llm_version": keras_llm.__version__,
        "tensorflow_version": tf.__version__,
        "source": lm.metadata.get("source"),
        "preset": lm.metadata.get("preset"),
        "architecture": lm.metadata.get("architecture", "llama"),
        "config": lm.config.to_dict(),
        "dtype": find_layer(lm.model, "layer_0_query").compute_dtype,
        "quantization": lm.metadata.get("quantization"),
        "sparsity": lm.metadata.get("sparsity"),
        "tokenizer": {"type": "byte_level_bpe", "vocabulary_size": lm.tokenizer.vocabulary_size,
                      "bos_id": lm.tokenizer.bos_id, "eos_id": lm.tokenizer.eos_id,
                      "pad_id": module._pad, "stop_ids": module._stop_ids},  # pylint: disable=protected-access
        "chat_template": lm.tokenizer.chat_template,
        "chat_applied_in_graph": chat,
        "context_length": lm.config.context_length,
        "max_new_tokens": int(max_new_tokens),
        "xla": bool(jit_compile),
        "signatures": list(SIGNATURES),
        "engine_functions": ["engine.allocate", "engine.prefill", "engine.decode"],
    }
    assets = os.path.join(staging, "assets")
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, METADATA_ASSET), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2, ensure_ascii=False)
    lm.tokenizer.save_assets(assets)
    if warmup:
        write_warmup(os.path.join(staging, "assets.extra", WARMUP_FILE), model_name)
    if litert:
        try:
            _write_litert(lm, staging, litert, litert_batch_sizes, litert_max_length,
                          litert_lengths, metadata, progress)
        except Exception as error:  # pylint: disable=broad-except
            if not litert_optional:
                raise
            print(f"keras-llm: no LiteRT file in the export (conversion failed: {error}); "
                  "the server will decode with XLA", file=sys.stderr, flush=True)


def _copy_user_litert(lm, module, staging):
    """Copy the LiteRT file a user's model decodes with into the export and
    return its metadata record (None without one): the file with its KV
    cache where it has one (a `MultiHeadAttention` model's, a mapped
    Llama's), which `keras-llm serve` runs as it runs a Llama export's, else
    the recompute forward pass's."""
    from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
    folder = os.path.dirname(artifacts.EXPORT_LITERT)
    backend = lm.engine.backend
    if isinstance(backend, LiteRTBackend):
        runner = backend.runner
        names = [os.path.join(folder, os.path.basename(path)) for path in runner.paths]
        record = {"kind": "cache", "cache": {"num_layers": runner.num_layers,
                                             "num_key_value_heads": runner.num_key_value_heads,
                                             "head_dim": runner.head_dim}}
        sources = runner.paths
    elif module.litert_file:
        names = [os.path.join(folder, "recompute.tflite")]
        record = {"kind": "recompute", "row_counts": module.litert_row_counts}
        sources = [module.litert_file]
    else:
        return None
    os.makedirs(os.path.join(staging, folder), exist_ok=True)
    for source, name in zip(sources, names):
        shutil.copyfile(source, os.path.join(staging, name))
    return {"file": names[0], "files": names, "precision": "float32", **record}


def _write_litert(lm, staging, precision, batch_sizes, max_length, lengths, metadata,
                  progress=False):
    """Convert the model for the LiteRT serving path and record it in the
    metadata asset. int8 smoothing calibrates on `litert.CALIBRATION_TEXT`
    (its first 128 tokens, as the benchmark's in-process LiteRT engine)."""
    from keras_llm import litert  # pylint: disable=import-outside-toplevel
    if precision not in ("float32", "float16", "int8", "int4"):
        raise ExportError(f"litert must be float32, float16, int8 or int4, got {precision!r}")
    defaults = artifacts.DEFAULT_LITERT
    batch_sizes = defaults["batch_sizes"] if batch_sizes is None else batch_sizes
    max_length = min(int(defaults["max_length"] if max_length is None else max_length),
                     lm.config.context_length)
    lengths = [n for n in (defaults["lengths"] if lengths is None else lengths) if n < max_length]
    path = os.path.join(staging, artifacts.EXPORT_LITERT)
    options = {"max_length": max_length, "batch_sizes": sorted(int(b) for b in batch_sizes),
               "lengths": sorted(int(n) for n in lengths), "prefill_length": min(64, max_length),
               "verify_length": min(defaults["verify_length"], max_length)}
    cached = artifacts.cached_litert(lm.source, precision, options) if lm.source else None
    if cached:  # the model's own LiteRT files were built with these options: reuse them
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # float32.tflite, float32.decode_b4.tflite, ... -> model.tflite, model.decode_b4.tflite
        cached_stem = os.path.basename(cached[0])[:-len(".tflite")]
        paths = [path[:-len(".tflite")] + os.path.basename(f)[len(cached_stem):] for f in cached]
        for source, target in zip(cached, paths):
            shutil.copyfile(source, target)
    else:
        with artifacts.conversion_progress(precision, "for keras-llm serve", progress) as report:
            paths = [litert.convert(lm.model, path,
                                    quantization=None if precision == "float32" else precision,
                                    max_length=max_length, batch_sizes=batch_sizes,
                                    prefill_length=options["prefill_length"],
                                    verify_length=options["verify_length"],
                                    calibration_ids=(litert.calibration_ids(lm.tokenizer)
                                                     if precision in artifacts.QUANTIZED_LITERT
                                                     else None),
                                    lengths=lengths, progress=report)]
    metadata["litert"] = {"file": artifacts.EXPORT_LITERT,
                          "files": [os.path.relpath(p, staging) for p in paths],
                          "precision": precision,
                          "batch_sizes": sorted(int(b) for b in batch_sizes),
                          "max_length": max_length, "lengths": sorted(int(n) for n in lengths),
                          "verify_length": options["verify_length"]}
    with open(os.path.join(staging, "assets", METADATA_ASSET), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2, ensure_ascii=False)


def warmup_requests(model_name):
    """`PredictionLog`s that exercise every signature once (small inputs)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2  # pylint: disable=import-outside-toplevel

    def request(signature, inputs):
        req = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        for key, value in inputs.items():
            req.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req))

    prompts = np.array([p.encode() for p in WARMUP_PROMPTS], dtype=object)
    batch = len(prompts)
    ids = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
    return [
        request("serving_default", {"prompt": prompts}),
        request("generate", {"prompt": prompts,
                             "max_new_tokens": np.full([batch], 4, np.int32),
                             "temperature": np.array([0.0, 0.8], np.float32),
                             "top_p": np.array([1.0, 0.9], np.float32),
                             "top_k": np.array([0, 40], np.int32),
                             "seed": np.array([0, 1], np.int32)}),
        request("generate_ids", {"token_ids": ids, "num_tokens": np.array([3, 2], np.int32),
                                 "max_new_tokens": np.full([2], 4, np.int32),
                                 "temperature": np.zeros([2], np.float32),
                                 "top_p": np.ones([2], np.float32),
                                 "top_k": np.zeros([2], np.int32),
                                 "seed": np.zeros([2], np.int32)}),
        request("score", {"token_ids": ids, "num_tokens": np.array([3, 2], np.int32)}),
    ]


def write_warmup(path, model_name, signatures=SIGNATURES):
    """Warm-up records for the `signatures` an export has."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for log in warmup_requests(model_name):
            if log.predict_log.request.model_spec.signature_name in signatures:
                writer.write(log.SerializeToString())


BATCHING_PARAMETERS = """\
# TF Serving batching for keras-llm generation signatures
# (tensorflow_model_server --enable_batching --batching_parameters_file=THIS).
# A generation request holds its batch for the whole decode loop, so batches
# are formed quickly (short timeout) and kept moderate; allowed sizes line up
# with compiled shapes so XLA compiles a known, small number of programs.
max_batch_size { value: 16 }
batch_timeout_micros { value: 5000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 1 }
allowed_batch_sizes: 1
allowed_batch_sizes: 2
allowed_batch_sizes: 4
allowed_batch_sizes: 8
allowed_batch_sizes: 16
# Prompts are strings, so no padding of variable-length inputs is needed.
# Do not enable pad_variable_length_inputs for generate_ids/score: TF Serving
# pads with the tensor's first element, not with a pad id.
pad_variable_length_inputs: false
"""


def write_serving_configs(base, model_name, jit_compile):
    """Example `batching_parameters.pbtxt` and `models.config` beside the versions."""
    model_dir = os.path.join(base, model_name)
    with open(os.path.join(model_dir, "batching_parameters.pbtxt"), "w", encoding="utf-8") as f:
        f.write(BATCHING_PARAMETERS)
    flags = "--xla_cpu_compilation_enabled " if jit_compile else ""
    with open(os.path.join(model_dir, "models.config"), "w", encoding="utf-8") as f:
        f.write(
            "# tensorflow_model_server --port=8500 --model_config_file=THIS "
            f"{flags}--enable_batching --batching_parameters_file="
            f"{os.path.join(model_dir, 'batching_parameters.pbtxt')}\n"
            "model_config_list {\n"
            "  config {\n"
            f"    name: \"{model_name}\"\n"
            f"    base_path: \"{model_dir}\"\n"
            "    model_platform: \"tensorflow\"\n"
            "    model_version_policy { latest { num_versions: 1 } }\n"
            "  }\n"
            "}\n")
