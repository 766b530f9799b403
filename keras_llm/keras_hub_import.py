"""Import keras-hub `LlamaCausalLM` / `GemmaCausalLM` `.keras` files
without Keras 3.

A Keras 3 `.keras` file is a zip of `config.json` (the task and its
backbone's constructor arguments) and `model.weights.h5` (each layer's
variables under `layers/<backbone>/layers/<layer>/.../vars/<i>`). Both are
read with `zipfile`, `json` and `h5py`; the backbone's arguments become a
`LlamaConfig` and its EinsumDense kernels, `(hidden, heads, head_dim)` and
the like, are reshaped into the one builder's `Dense` kernels. keras-hub's
RoPE is the "rotate half" one `apply_rotary` uses, so no rows move.

Example:
    >>> model, tokenizer, metadata = load_keras_hub("gemma_tiny.keras")
"""

import io
import json
import math
import os
import re
import zipfile

import numpy as np

from keras_llm.config import LlamaConfig

TASKS = {"keras_hub>LlamaCausalLM": "llama", "keras_hub>GemmaCausalLM": "gemma"}
_BACKBONES = {"keras_hub>LlamaBackbone": "llama", "keras_hub>GemmaBackbone": "gemma"}
_WEIGHTS = "model.weights.h5"


class KerasHubImportError(ValueError):
    """The file is not a keras-hub model keras-llm can import."""


def _read_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def is_keras_hub_file(path):
    """Whether `path` is a Keras 3 `.keras` zip whose model is a keras-hub
    class (its config's `registered_name` starts with `keras_hub>`)."""
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return False
    config = _read_config(path)
    return bool(config) and str(config.get("registered_name", "")).startswith("keras_hub>")


def config_from_keras_hub(task_config, context_length=None, tied=True):
    """The `LlamaConfig` of a keras-hub task's `config.json`.

    Args:
        task_config: the parsed config.json of a `.keras` file.
        context_length: longest sequence to build for (default 2048: keras-hub
            backbones do not record one).
        tied: whether the checkpoint's output head is the token embedding.

    Returns:
        `(config, arch)`.
    """
    name = task_config.get("registered_name")
    backbone = (task_config.get("config") or {}).get("backbone") or {}
    arch = _BACKBONES.get(backbone.get("registered_name"))
    if name not in TASKS or arch is None:
        raise KerasHubImportError(f"unsupported keras-hub model {name!r} "
                                  f"(backbone {backbone.get('registered_name')!r}); "
                                  f"keras-llm imports {sorted(TASKS)}")
    b = backbone["config"]
    if arch == "llama":
        if b.get("rope_position_scaling_factor", 1.0) != 1.0 or b.get(
                "rope_frequency_adjustment_factor") is not None:
            raise KerasHubImportError("keras-hub Llama with RoPE scaling is not supported")
        head_dim = b["hidden_dim"] // b["num_query_heads"]
        extra = dict(rope_theta=float(b.get("rope_max_wavelength", 10000)),
                     intermediate_dim=int(b["intermediate_dim"]))
    else:
        gemma2 = [k for k in ("use_post_ffw_norm", "use_post_attention_norm",
                              "final_logit_soft_cap", "attention_logit_soft_cap",
                              "use_sliding_window_attention") if b.get(k)]
        if gemma2 or not b.get("query_head_dim_normalize", True):
            raise KerasHubImportError(f"Gemma 2 options {gemma2 or ['query_head_dim_normalize']} "
                                      "are not supported (Gemma 1 only)")
        head_dim = int(b["head_dim"])
        extra = dict(rope_theta=10000.0, intermediate_dim=int(b["intermediate_dim"]) // 2,
                     mlp_activation="gelu_tanh", norm_weight_offset=1.0,
                     embedding_scale=math.sqrt(b["hidden_dim"]))
    config = LlamaConfig(
        vocabulary_size=int(b["vocabulary_size"]), hidden_dim=int(b["hidden_dim"]),
        num_layers=int(b["num_layers"]), num_query_heads=int(b["num_query_heads"]),
        num_key_value_heads=int(b.get("num_key_value_heads") or b["num_query_heads"]),
        head_dim=head_dim, rms_norm_epsilon=float(b.get("layer_norm_epsilon", 1e-6)),
        context_length=int(context_length or 2048), tie_word_embeddings=tied, **extra)
    return config, arch


def _arrays(handle):
    """`{path of a vars group: [arrays in index order]}` of an h5 weights file."""
    found = {}

    def visit(name, item):
        parts = name.split("/")
        if len(parts) >= 2 and parts[-2] == "vars" and hasattr(item, "shape"):
            found.setdefault("/".join(parts[:-2]), {})[int(parts[-1])] = np.asarray(
                item, np.float32)

    handle.visititems(visit)
    return {k: [v[i] for i in sorted(v)] for k, v in found.items()}


def _ordered_blocks(arrays, backbone, stem):
    """Decoder block group names in creation order (`stem`, `stem_1`, ...)."""
    pattern = re.compile(rf"^layers/{re.escape(backbone)}/layers/({re.escape(stem)}(?:_(\d+))?)/")
    blocks = {}
    for key in arrays:
        match = pattern.match(key)
        if match:
            blocks[match.group(1)] = int(match.group(2) or 0)
    return sorted(blocks, key=blocks.get)


# Per block: keras-hub sub-path -> (our layer, how its kernel is reshaped).
_LLAMA_BLOCK = {
    "_self_attention_layernorm": ("attention_norm", "vector"),
    "_self_attention_layer/_query_dense": ("query", "in_first"),
    "_self_attention_layer/_key_dense": ("key", "in_first"),
    "_self_attention_layer/_value_dense": ("value", "in_first"),
    "_self_attention_layer/_output_dense": ("attention_output", "in_last"),
    "_feedforward_layernorm": ("mlp_norm", "vector"),
    "_feedforward_gate_dense": ("mlp_gate", "in_first"),
    "_feedforward_intermediate_dense": ("mlp_up", "in_first"),
    "_feedforward_output_dense": ("mlp_down", "in_first"),
}
_GEMMA_BLOCK = {
    "pre_attention_norm": ("attention_norm", "vector"),
    "attention/query_dense": ("query", "heads_first"),
    "attention/key_dense": ("key", "heads_first"),
    "attention/value_dense": ("value", "heads_first"),
    "attention/output_dense": ("attention_output", "in_last"),
    "pre_ffw_norm": ("mlp_norm", "vector"),
    "gating_ffw": ("mlp_gate", "in_first"),
    "gating_ffw_2": ("mlp_up", "in_first"),
    "ffw_linear": ("mlp_down", "in_first"),
}
_LAYOUT = {
    "llama": ("llama_backbone", "llama_transformer_decoder", "llama_layer_norm", _LLAMA_BLOCK),
    "gemma": ("gemma_backbone", "gemma_decoder_block", "rms_normalization", _GEMMA_BLOCK),
}


def _kernel(array, layout):
    """A Dense kernel `(in, out)` from a keras-hub kernel."""
    if layout == "heads_first":  # (heads, hidden, head_dim) -> (hidden, heads * head_dim)
        return array.transpose(1, 0, 2).reshape(array.shape[1], -1)
    if layout == "in_last":  # (heads, head_dim, hidden) -> (heads * head_dim, hidden)
        return array.reshape(-1, array.shape[-1])
    return array.reshape(array.shape[0], -1)  # (hidden, heads, head_dim) or (in, out)


def load_keras_hub(path, context_length=None, progress=True):  # pylint: disable=unused-argument
    """Build a model from a keras-hub `LlamaCausalLM`/`GemmaCausalLM` `.keras` file.

    Args:
        path: the `.keras` file (`task.save(path)` in Keras 3).
        context_length: context length to build for (default 2048).
        progress: unused (the read is one pass); kept for `load_gguf`'s signature.

    Returns:
        `(model, None, metadata)`: keras-hub keeps its tokenizer in a preset's
        assets, not in the `.keras` file, so the model runs on token ids.
    """
    import h5py  # pylint: disable=import-outside-toplevel
    from keras_llm.models import assign_weights, build_llama  # pylint: disable=import-outside-toplevel

    task_config = _read_config(path)
    if task_config is None:
        raise KerasHubImportError(f"{path} is not a Keras 3 .keras file (no config.json)")
    with zipfile.ZipFile(path) as archive:
        if _WEIGHTS not in archive.namelist():
            raise KerasHubImportError(f"{path} has no {_WEIGHTS}")
        with h5py.File(io.BytesIO(archive.read(_WEIGHTS)), "r") as handle:
            arrays = _arrays(handle)
    backbone_name = task_config["config"]["backbone"]["config"].get("name")
    arch = TASKS.get(task_config.get("registered_name"))
    default_backbone, stem, final_norm, block = _LAYOUT.get(arch, _LAYOUT["llama"])
    backbone_name = backbone_name or default_backbone
    root = f"layers/{backbone_name}/layers/"
    embedding = arrays.get(root + "reversible_embedding", [])
    config, arch = config_from_keras_hub(task_config, context_length, tied=len(embedding) == 1)
    weights = {"token_embedding": embedding[:1], "final_norm": arrays.get(root + final_norm)}
    if not config.tie_word_embeddings:
        weights["lm_head"] = [embedding[1]]  # keras-hub's reverse kernel is (hidden, vocab)
    blocks = _ordered_blocks(arrays, backbone_name, stem)
    if len(blocks) != config.num_layers:
        raise KerasHubImportError(f"{path} has {len(blocks)} decoder blocks, its config "
                                  f"says {config.num_layers}")
    for i, group in enumerate(blocks):
        for sub, (layer, layout) in block.items():
            found = arrays.get(f"{root}{group}/{sub}")
            if not found:
                raise KerasHubImportError(f"{path} lacks {root}{group}/{sub}")
            weights[f"layer_{i}_{layer}"] = [found[0] if layout == "vector"
                                             else _kernel(found[0], layout)]
    model = build_llama(config, name=os.path.splitext(os.path.basename(path))[0] or arch)
    assign_weights(model, weights, path, KerasHubImportError)
    metadata = {"source": os.path.abspath(path), "source_format": "keras-hub",
                "architecture": arch, "dtype": "float32", "quantization": None,
                "sparsity": None, "config": config.to_dict()}
    return model, None, metadata
