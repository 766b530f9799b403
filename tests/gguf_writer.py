"""Write small Llama GGUF files the way llama.cpp's converter does."""

import gguf
import numpy as np

from keras_llm.models import config_from_model


def permute_rope_rows(weight, num_heads):
    """llama.cpp's reordering of query/key rows (the inverse of ours)."""
    out_dim, in_dim = weight.shape
    half = out_dim // num_heads // 2
    return weight.reshape(num_heads, 2, half, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def write_llama_gguf(path, model, tokenizer, tensor_type="F32", name="tiny"):
    """Write `model` (built by `build_llama`) and `tokenizer` as a GGUF file.

    Args:
        tensor_type: GGML type of the 2-D weights: F32, F16, Q8_0, Q4_0, Q4_1
            (norms stay F32, as llama.cpp keeps them).
    """
    cfg = config_from_model(model)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_basename(name)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_dim)
    writer.add_feed_forward_length(cfg.intermediate_dim)
    writer.add_head_count(cfg.num_query_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_epsilon)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocabulary_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    vocab = tokenizer.vocabulary
    writer.add_token_list(vocab)
    specials = set(tokenizer.special_token_ids)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(vocab))])
    writer.add_token_merges(tokenizer.get_config()["merges"])
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)

    qtype = gguf.GGMLQuantizationType[tensor_type]

    def add(tensor_name, array, quantize=True):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not quantize or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, array.astype(np.float16))
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)

    weight = lambda layer_name: model.get_layer(layer_name).get_weights()[0]  # noqa: E731
    add("token_embd.weight", weight("token_embedding"))
    add("output_norm.weight", weight("final_norm"), quantize=False)
    if not cfg.tie_word_embeddings:
        add("output.weight", weight("lm_head").T)
    names = {"attn_norm": "attention_norm", "attn_q": "query", "attn_k": "key",
             "attn_v": "value", "attn_output": "attention_output", "ffn_norm": "mlp_norm",
             "ffn_gate": "mlp_gate", "ffn_up": "mlp_up", "ffn_down": "mlp_down"}
    for i in range(cfg.num_layers):
        for gguf_name, layer_name in names.items():
            w = weight(f"layer_{i}_{layer_name}")
            if w.ndim == 1:
                add(f"blk.{i}.{gguf_name}.weight", w, quantize=False)
                continue
            w = w.T  # Keras (in, out) -> GGUF rows (out, in)
            if gguf_name == "attn_q":
                w = permute_rope_rows(w, cfg.num_query_heads)
            elif gguf_name == "attn_k":
                w = permute_rope_rows(w, cfg.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
