"""Import Hugging Face checkpoints (`save_pretrained` directories) of
Llama-family decoders: Llama, Mistral, Qwen2, Gemma and Phi-3.

A directory is read from what it holds: `config.json` (its
`architectures[0]` picks the mapping), `model.safetensors` or the shards
listed in `model.safetensors.index.json` (read with the `safetensors`
package's numpy API; bfloat16 tensors, which numpy cannot hold, are widened
to float32 from their raw bytes), and, when present, a byte-level BPE
`tokenizer.json` with `tokenizer_config.json`, `generation_config.json`
and `chat_template.jinja`. Every architecture is an option set of the one
builder, `build_llama` (see `LlamaConfig`); Phi-3's fused `qkv_proj` and
`gate_up_proj` weights are split into the separate projections. Hugging
Face's query/key rows are already in the "rotate half" layout that
`apply_rotary` uses (unlike GGUF's, see `gguf_import.unpermute_rope_rows`).

Nothing is written: `load_hf` returns a model in memory, like
`gguf_import.load_gguf`.

Example:
    >>> model, tokenizer, metadata = load_hf("/models/Qwen2-0.5B")
    >>> logits = model(tf.constant([[1, 2, 3]]))  # (1, 3, vocabulary)
"""

import json
import logging
import math
import os
import struct

import numpy as np

from keras_llm.config import LlamaConfig
from keras_llm.progress import Progress

LOG = logging.getLogger("keras_llm")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# config.json's architectures[0] -> our name for it.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GemmaForCausalLM": "gemma",
    "Phi3ForCausalLM": "phi3",
}
# Hugging Face's per-architecture defaults for keys `save_pretrained` may
# leave out of config.json.
_DEFAULTS = {
    "llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu"),
    "mistral": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu"),
    "qwen2": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu"),
    "gemma": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    "phi3": dict(tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu"),
}
# hidden_act -> LlamaConfig.mlp_activation. Gemma's legacy "gelu" means the
# tanh approximation (transformers rewrites it so).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}


class HFImportError(ValueError):
    """The directory is not a Hugging Face checkpoint keras-llm can import."""


def is_hf_dir(path):
    """Whether `path` is a directory with a `config.json` and safetensors
    weights (one file or an index of shards)."""
    path = os.fspath(path)
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
            and any(os.path.isfile(os.path.join(path, name))
                    for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)))


def weights_file(directory):
    """The file that stands for the directory's weights: `model.safetensors`
    or the shard index (what a cache of converted files is keyed on)."""
    single = os.path.join(directory, WEIGHTS_FILE)
    return single if os.path.isfile(single) else os.path.join(directory, WEIGHTS_INDEX_FILE)


def _read_json(path, required=False):
    if not os.path.isfile(path):
        if required:
            raise HFImportError(f"missing {path}")
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as error:
        raise HFImportError(f"{path} is not valid JSON: {error}") from None


# ----- config --------------------------------------------------------------


def _rope(hf, architecture):
    """`(rope_theta, rope_scaling)` from config.json: transformers >= 5 keeps
    them in `rope_parameters`, older versions at the top level and in
    `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "llama3"):
        raise HFImportError(f"{architecture} with rope scaling {rope_type!r} is not "
                            "supported (keras-llm implements plain RoPE and 'llama3')")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFImportError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    values = {**scaling, **rope}
    return theta, {"rope_type": "llama3", **{
        k: float(values[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                      "original_max_position_embeddings")}}


def config_from_hf(hf, context_length=None):
    """The `LlamaConfig` of a Hugging Face `config.json`.

    Args:
        hf: the parsed config.json.
        context_length: the longest sequence to build for (default: the
            checkpoint's `max_position_embeddings`, or its sliding window
            when that is shorter: Mistral, Phi-3, Qwen2 with
            `use_sliding_window`).

    Returns:
        `(config, arch)`: a `LlamaConfig` and our architecture name.

    Raises:
        HFImportError: an architecture or option keras-llm does not run.
    """
    architectures = hf.get("architectures") or []
    arch = ARCHITECTURES.get(architectures[0] if architectures else None)
    if arch is None:
        raise HFImportError(f"unsupported architecture {architectures or None}: keras-llm "
                            f"imports {sorted(ARCHITECTURES)}")
    get = lambda key, default=None: hf.get(key, _DEFAULTS[arch].get(key, default))  # noqa: E731
    activation = get("hidden_activation") or get("hidden_act")
    if arch == "gemma" and activation == "gelu":
        activation = "gelu_pytorch_tanh"
    if activation not in _ACTIVATIONS:
        raise HFImportError(f"hidden_act {activation!r} is not supported; supported: "
                            f"{sorted(_ACTIVATIONS)}")
    if arch in ("llama", "mistral") and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise HFImportError("attention_bias/mlp_bias Llama checkpoints (a bias on every "
                            "projection) are not supported")
    try:
        rope_theta, rope_scaling = _rope(hf, architectures[0])
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        maximum = int(hf.get("max_position_embeddings", 2048))
        window = (hf.get("sliding_window")
                  if arch in ("mistral", "phi3") or hf.get("use_sliding_window") else None)
        if window:  # within the window, sliding-window attention is full attention
            if context_length and context_length > window:
                raise HFImportError(f"context_length {context_length} exceeds the sliding "
                                    f"window ({window}); keras-llm has no sliding-window "
                                    "attention")
            maximum = min(maximum, int(window))
        config = LlamaConfig(
            vocabulary_size=int(hf["vocab_size"]),
            hidden_dim=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_query_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_dim=int(hf["intermediate_size"]),
            rope_theta=rope_theta,
            rms_norm_epsilon=float(get("rms_norm_eps")),
            context_length=int(context_length or maximum),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            attention_bias=arch == "qwen2",
            mlp_activation=_ACTIVATIONS[activation],
            norm_weight_offset=1.0 if arch == "gemma" else 0.0,
            embedding_scale=math.sqrt(hidden) if arch == "gemma" else None,
            rope_scaling=rope_scaling,
        )
    except KeyError as error:
        raise HFImportError(f"config.json lacks {error.args[0]!r}") from None
    return config, arch


# ----- weights -------------------------------------------------------------


def shard_files(directory):
    """The safetensors files holding the checkpoint, in index order.

    Raises:
        HFImportError: no weights, or a shard the index names is missing.
    """
    single = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(directory, WEIGHTS_INDEX_FILE)
    index = _read_json(index_path, required=True)
    names = list(dict.fromkeys(index.get("weight_map", {}).values()))
    if not names:
        raise HFImportError(f"{index_path} maps no tensors to shards")
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise HFImportError(f"{directory} lacks shards named in {WEIGHTS_INDEX_FILE}: {missing}")
    return [os.path.join(directory, n) for n in names]


def read_safetensors(path):
    """Every tensor of one safetensors file as a float32 numpy array.

    bfloat16 tensors (which numpy cannot represent) are read from their raw
    bytes at the offsets the file's header gives and widened exactly.

    Returns:
        `(tensors, dtypes)`: name -> float32 array, name -> stored dtype
        ("F32", "BF16", ...).
    """
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    tensors, dtypes = {}, {}
    try:
        with safe_open(path, framework="np") as handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
                if dtypes[name] != "BF16":
                    tensors[name] = np.asarray(handle.get_tensor(name), np.float32)
    except Exception as error:  # safetensors raises its own error types
        raise HFImportError(f"{path} is not a readable safetensors file: {error}") from None
    bfloat16 = [name for name, dtype in dtypes.items() if dtype == "BF16"]
    if bfloat16:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
            for name in bfloat16:
                start, end = header[name]["data_offsets"]
                handle.seek(8 + header_size + start)
                raw = np.frombuffer(handle.read(end - start), np.uint16)
                widened = (raw.astype(np.uint32) << 16).view(np.float32)
                tensors[name] = widened.reshape(header[name]["shape"])
    return tensors, dtypes


_BLOCK_TENSORS = {
    "input_layernorm.weight": ("attention_norm", "norm"),
    "post_attention_layernorm.weight": ("mlp_norm", "norm"),
    "self_attn.q_proj": ("query", "dense"),
    "self_attn.k_proj": ("key", "dense"),
    "self_attn.v_proj": ("value", "dense"),
    "self_attn.o_proj": ("attention_output", "dense"),
    "mlp.gate_proj": ("mlp_gate", "dense"),
    "mlp.up_proj": ("mlp_up", "dense"),
    "mlp.down_proj": ("mlp_down", "dense"),
}


def keras_weights(tensors, config):
    """Checkpoint tensors as `{layer name: [arrays for set_weights]}`.

    Linear weights `(out, in)` become kernels `(in, out)`; biases follow
    their kernel. Phi-3's `qkv_proj` rows are split into query, key, value
    (`H*D`, `KV*D`, `KV*D` rows) and `gate_up_proj` into gate and up.

    Args:
        tensors: Hugging Face name -> float32 array.
        config: the model's `LlamaConfig`.

    Raises:
        HFImportError: a tensor keras-llm has no place for.
    """
    parts = {}  # layer name -> {"kernel": ..., "bias": ...}

    def put(layer, kind, array):
        parts.setdefault(layer, {})[kind] = array

    q_rows = config.num_query_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    for name, array in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older checkpoints saved; recomputed by apply_rotary
        if name == "model.embed_tokens.weight":
            put("token_embedding", "weight", array)
        elif name == "model.norm.weight":
            put("final_norm", "weight", array)
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                put("lm_head", "kernel", array.T)
        elif name.startswith("model.layers."):
            index, _, rest = name[len("model.layers."):].partition(".")
            prefix = f"layer_{index}_"
            stem, _, kind = rest.rpartition(".")
            if rest in _BLOCK_TENSORS:
                put(prefix + _BLOCK_TENSORS[rest][0], "weight", array)
            elif stem in _BLOCK_TENSORS and kind in ("weight", "bias"):
                layer = prefix + _BLOCK_TENSORS[stem][0]
                put(layer, "kernel" if kind == "weight" else "bias",
                    array.T if kind == "weight" else array)
            elif rest == "self_attn.qkv_proj.weight":
                query, key, value = np.split(array, [q_rows, q_rows + kv_rows])
                for layer, rows in (("query", query), ("key", key), ("value", value)):
                    put(prefix + layer, "kernel", rows.T)
            elif rest == "mlp.gate_up_proj.weight":
                gate, up = np.split(array, 2)
                put(prefix + "mlp_gate", "kernel", gate.T)
                put(prefix + "mlp_up", "kernel", up.T)
            else:
                raise HFImportError(f"unsupported tensor {name!r}")
        else:
            raise HFImportError(f"unsupported tensor {name!r}")
    return {layer: [found[k] for k in ("weight", "kernel", "bias") if k in found]
            for layer, found in parts.items()}


# ----- tokenizer -----------------------------------------------------------


def _pretokenizer(spec):
    """Our `BytePairTokenizer.pretokenizer` for a tokenizer.json
    `pre_tokenizer`, or None when it is not one we reproduce exactly."""
    def byte_level(item):
        return (item.get("type") == "ByteLevel" and not item.get("add_prefix_space", False)
                and item.get("use_regex", True))

    if spec and byte_level(spec):
        return "gpt2"
    if spec and spec.get("type") == "Sequence":
        items = spec.get("pretokenizers") or []
        if (len(items) == 2 and items[0].get("type") == "Digits"
                and items[0].get("individual_digits") and byte_level(items[1])):
            return "smollm"
    return None


def _token_id(value, index):
    """An id from a tokenizer_config token (a string or `{"content": ...}`)."""
    if isinstance(value, dict):
        value = value.get("content")
    return index.get(value) if isinstance(value, str) else None


def _first(value):
    return value[0] if isinstance(value, list) and value else (
        value if isinstance(value, int) else None)


def tokenizer_from_hf(directory, hf_config=None):
    """The directory's tokenizer as a `BytePairTokenizer`.

    Args:
        directory: the checkpoint directory.
        hf_config: its parsed config.json (for bos/eos ids as a last resort).

    Returns:
        `(tokenizer, None)`, or `(None, reason)` when there is no
        `tokenizer.json` or it is not byte-level BPE with a pre-tokenizer
        keras-llm reproduces exactly (ByteLevel, or Digits + ByteLevel).
    """
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None, f"no {TOKENIZER_FILE}"
    spec = _read_json(path)
    model = spec.get("model") or {}
    plain = not (model.get("byte_fallback") or model.get("ignore_merges")
                 or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                 or spec.get("normalizer"))
    if model.get("type") != "BPE" or not plain:
        return None, (f"tokenizer model {model.get('type')!r} with options keras-llm does not "
                      "reproduce (byte_fallback, ignore_merges, subword prefix/suffix or a "
                      "normalizer); only plain byte-level BPE is supported")
    pretokenizer = _pretokenizer(spec.get("pre_tokenizer"))
    if pretokenizer is None:
        kind = (spec.get("pre_tokenizer") or {}).get("type")
        return None, (f"pre_tokenizer {kind!r} is not one keras-llm reproduces "
                      "(ByteLevel, or Digits(individual) + ByteLevel)")
    index = dict(model.get("vocab") or {})
    added = spec.get("added_tokens") or []
    for token in added:
        index[token["content"]] = int(token["id"])
    size = max(index.values()) + 1
    vocabulary = [f"<|unused_{i}|>" for i in range(size)]  # ids the file leaves out
    for token, i in index.items():
        vocabulary[i] = token
    settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    hf_config = hf_config or {}

    def special_id(name):
        found = _token_id(settings.get(f"{name}_token"), index)
        if found is None:
            found = _first(generation.get(f"{name}_token_id"))
        return found if found is not None else _first(hf_config.get(f"{name}_token_id"))

    post = spec.get("post_processor") or {}
    bos_id = special_id("bos")
    add_bos = settings.get("add_bos_token")
    if add_bos is None:  # a TemplateProcessing post-processor that starts with bos
        single = (post.get("single") or []) if post.get("type") == "TemplateProcessing" else []
        first = single[0].get("SpecialToken", {}).get("id") if single else None
        add_bos = first is not None and index.get(first) == bos_id
    template_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as handle:
            template = handle.read()
    else:
        template = settings.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template
                             if t.get("name") == "default"), None)
    from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = BytePairTokenizer(
        vocabulary=vocabulary,
        merges=list(model.get("merges") or []),
        special_tokens=[t["content"] for t in added if t.get("special")],
        bos_id=bos_id,
        eos_id=special_id("eos"),
        pad_id=special_id("pad"),
        unk_id=_token_id(model.get("unk_token"), index),
        add_bos=bool(add_bos),
        chat_template=template,
        pretokenizer=pretokenizer,
    )
    return tokenizer, None


# ----- the whole import ----------------------------------------------------


def load_hf(directory, context_length=None, progress=True):
    """Build a model and tokenizer from a Hugging Face checkpoint directory.

    Args:
        directory: a `save_pretrained` directory (see `is_hf_dir`).
        context_length: override the context length the model is built for.
        progress: show a progress bar on stderr.

    Returns:
        `(model, tokenizer, metadata)`; `tokenizer` is None when the
        directory has no tokenizer keras-llm can represent (the reason is
        `metadata["tokenizer_unsupported"]`, and is logged): the model then
        runs on token ids.

    Raises:
        HFImportError: not a checkpoint, an unsupported architecture or
            option, missing shards or weights, shapes that do not match.
    """
    from keras_llm.models import assign_weights, build_llama  # pylint: disable=import-outside-toplevel

    directory = os.path.abspath(os.fspath(directory))
    if not is_hf_dir(directory):
        raise HFImportError(f"{directory} is not a Hugging Face checkpoint directory "
                            f"(needs {CONFIG_FILE} and {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})")
    hf = _read_json(os.path.join(directory, CONFIG_FILE), required=True)
    config, arch = config_from_hf(hf, context_length)
    files = shard_files(directory)
    bar = Progress(len(files), f"importing {os.path.basename(directory)}", enabled=progress)
    tensors, counts = {}, {}
    for path in files:
        found, dtypes = read_safetensors(path)
        tensors.update(found)
        for dtype in dtypes.values():
            counts[dtype] = counts.get(dtype, 0) + 1
        bar.update(1)
    bar.close()
    weights = keras_weights(tensors, config)
    del tensors
    model = build_llama(config, name=_model_name(hf, arch))
    assign_weights(model, weights, directory, HFImportError)
    tokenizer, reason = tokenizer_from_hf(directory, hf)
    metadata = {
        "source": directory,
        "source_format": "safetensors",
        "source_tensor_types": counts,
        "name": os.path.basename(directory),
        "architecture": arch,
        "hf_architecture": hf["architectures"][0],
        "dtype": "float32",
        "quantization": None,
        "sparsity": None,
        "config": config.to_dict(),
    }
    if reason is not None:
        LOG.warning("%s: no tokenizer (%s); the model runs on token ids", directory, reason)
        metadata["tokenizer_unsupported"] = reason
    return model, tokenizer, metadata


def _model_name(hf, arch):
    name = hf.get("_name_or_path") or arch
    name = os.path.basename(str(name).rstrip("/")) or arch
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)
