"""Import Llama-family GGUF checkpoints into keras-llm model directories.

Reads the architecture and tokenizer from the file's metadata, dequantizes
each tensor with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, and
the other types it knows), undoes llama.cpp's RoPE row permutation of the
query and key projections, and writes a model directory (see `model_dir`).
"""

import os

import numpy as np

from keras_llm.config import LlamaConfig
from keras_llm.progress import Progress


class GGUFError(ValueError):
    """The file is not a GGUF checkpoint keras-llm can import."""


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _open(path):
    import gguf  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(path):
        raise GGUFError(f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises several types on bad files
        raise GGUFError(f"{path} is not a readable GGUF file: {error}") from None


def config_from_gguf(reader, context_length=None):
    """The `LlamaConfig` described by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"unsupported architecture {arch!r}: keras-llm imports 'llama'")
    get = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocabulary_size = int(get("vocab_size", len(tokens) if tokens else 0))
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocabulary_size=vocabulary_size,
        hidden_dim=hidden,
        num_layers=int(get("block_count")),
        num_query_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("rope.dimension_count", hidden // heads)),
        intermediate_dim=int(get("feed_forward_length")),
        rope_theta=_float32(get("rope.freq_base", 10000.0)),
        rms_norm_epsilon=_float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(context_length or get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )


def _float32(value):
    """GGUF stores float32: keep the shortest decimal that reads back the same."""
    return float(str(np.float32(value)))


def unpermute_rope_rows(weight, num_heads):
    """Undo llama.cpp's reordering of query/key rows for its RoPE layout.

    llama.cpp stores each head's rows interleaved as (pairs, 2); the
    Hugging Face layout, which `apply_rotary` uses, has the two halves of a
    head one after the other.

    Args:
        weight: `(out, in)` rows as stored in the GGUF file.
        num_heads: heads the rows belong to.
    """
    out_dim, in_dim = weight.shape
    half = out_dim // num_heads // 2
    return (weight.reshape(num_heads, half, 2, in_dim)
            .swapaxes(1, 2).reshape(out_dim, in_dim))


_BLOCK_TENSORS = {
    "attn_norm": ("attention_norm", "norm"),
    "attn_q": ("query", "dense"),
    "attn_k": ("key", "dense"),
    "attn_v": ("value", "dense"),
    "attn_output": ("attention_output", "dense"),
    "ffn_norm": ("mlp_norm", "norm"),
    "ffn_gate": ("mlp_gate", "dense"),
    "ffn_up": ("mlp_up", "dense"),
    "ffn_down": ("mlp_down", "dense"),
}


def read_weights(reader, config, progress=None):
    """Dequantized weights keyed by keras-llm layer name, in Keras layout.

    Returns:
        dict: layer name -> list of numpy arrays for `layer.set_weights`.
    """
    import gguf  # pylint: disable=import-outside-toplevel

    weights, types = {}, {}
    for tensor in reader.tensors:
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                           dtype=np.float32)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        types[tensor.name] = tensor.tensor_type.name
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            weights["token_embedding"] = [array]
        elif tensor.name == "output_norm.weight":
            weights["final_norm"] = [array]
        elif tensor.name == "output.weight":
            weights["lm_head"] = [array.T]
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_TENSORS:
            name, kind = _BLOCK_TENSORS[parts[2]]
            if parts[2] == "attn_q":
                array = unpermute_rope_rows(array, config.num_query_heads)
            elif parts[2] == "attn_k":
                array = unpermute_rope_rows(array, config.num_key_value_heads)
            weights[f"layer_{parts[1]}_{name}"] = [array.T if kind == "dense" else array]
        else:
            raise GGUFError(f"unsupported tensor {tensor.name!r} in a llama GGUF file")
        if progress is not None:
            progress.update(1)
    return weights, types


def load_gguf(path, context_length=None, progress=True):
    """Build a model and tokenizer from a GGUF file.

    Args:
        path: the `.gguf` file.
        context_length: override the context length the model is built for.
        progress: show a progress bar on stderr.

    Returns:
        `(model, tokenizer, metadata)`.
    """
    from keras_llm.models import assign_weights, build_llama  # pylint: disable=import-outside-toplevel
    from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel

    reader = _open(path)
    config = config_from_gguf(reader, context_length)
    bar = Progress(len(reader.tensors), f"importing {os.path.basename(path)}", enabled=progress)
    weights, types = read_weights(reader, config, bar)
    bar.close()
    model = build_llama(config, name=_model_name(reader))
    assign_weights(model, weights, path, GGUFError)
    tokenizer = BytePairTokenizer.from_gguf(reader)
    counts = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    metadata = {
        "source": os.path.abspath(path),
        "source_format": "gguf",
        "source_tensor_types": counts,
        "name": _field(reader, "general.name"),
        "license": _field(reader, "general.license"),
        "architecture": "llama",
        "dtype": "float32",
        "quantization": None,
        "sparsity": None,
        "config": config.to_dict(),
    }
    return model, tokenizer, metadata


def _model_name(reader):
    name = _field(reader, "general.basename") or "llama"
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(name))
