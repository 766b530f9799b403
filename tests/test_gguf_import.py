"""GGUF import on small files written like llama.cpp writes them."""

import numpy as np
import pytest

import keras_llm
from keras_llm import gguf_import, saving
from keras_llm.models import config_from_model
from tests.gguf_writer import permute_rope_rows, write_llama_gguf
from tests.helpers import byte_level_tokenizer, tiny_model

MERGES = ["h e", "l l", "he ll", "o Ġ", "Ġ w"]
IDS = np.array([[40, 72, 101, 108, 260, 5]], np.int32)


def _source(tied=True):
    tokenizer = byte_level_tokenizer(MERGES)
    # Quantized GGML blocks hold 32 values: every row length a multiple of 32.
    model = tiny_model(seed=11, vocabulary_size=tokenizer.vocabulary_size, hidden_dim=32,
                       num_query_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_dim=64, tie_word_embeddings=tied)
    return model, tokenizer


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    np.testing.assert_array_equal(
        gguf_import.unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    assert not np.array_equal(permute_rope_rows(w, 3), w)


@pytest.mark.parametrize("tied", [True, False])
def test_f32_import_reproduces_the_model_exactly(tmp_path, tied):
    model, tokenizer = _source(tied)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, model, tokenizer, "F32")
    imported, tok, meta = gguf_import.load_gguf(str(path), progress=False)
    assert config_from_model(imported) == config_from_model(model)
    np.testing.assert_array_equal(imported(IDS).numpy(), model(IDS).numpy())
    assert tok.get_config() == tokenizer.get_config() | {"chat_template": tok.get_config()["chat_template"]}
    assert meta["architecture"] == "llama" and meta["source_tensor_types"] == {"F32": 2 + 9 * 2 + (0 if tied else 1)}


# Largest |error| of one weight relative to its row's max |value|.
TOLERANCE = {"F16": 1e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15}


@pytest.mark.parametrize("tensor_type", sorted(TOLERANCE))
def test_quantized_imports_dequantize_into_the_right_places(tmp_path, tensor_type):
    model, tokenizer = _source()
    path = tmp_path / f"tiny-{tensor_type}.gguf"
    write_llama_gguf(path, model, tokenizer, tensor_type)
    imported, _, meta = gguf_import.load_gguf(str(path), progress=False)
    assert tensor_type in meta["source_tensor_types"]
    for layer in model.layers:
        for original, loaded in zip(layer.get_weights(), imported.get_layer(layer.name).get_weights()):
            # GGML quantizes along rows: a Dense kernel's input axis, an embedding's width.
            axis = None if original.ndim == 1 else (1 if layer.name == "token_embedding" else 0)
            scale = np.abs(original).max(axis=axis, keepdims=True)
            assert np.all(np.abs(original - loaded) <= TOLERANCE[tensor_type] * scale + 1e-6), layer.name
    if tensor_type in ("F16", "Q8_0"):  # 4-bit error on random weights is too large to compare logits
        expected = model(IDS).numpy()
        np.testing.assert_allclose(imported(IDS).numpy(), expected,
                                   atol={"F16": 0.01, "Q8_0": 0.05}[tensor_type] * np.abs(expected).max())


def test_import_to_model_dir_and_generate(tmp_path):
    model, tokenizer = _source()
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, model, tokenizer, "F32")
    lm = keras_llm.load(str(path), progress=False)
    out = lm.generate("hello", max_new_tokens=5, stop_ids=())
    directory = saving.save_model_dir(tmp_path / "dir", lm.model, lm.tokenizer, lm.metadata)
    reloaded = keras_llm.load(directory)
    assert reloaded.generate("hello", max_new_tokens=5, stop_ids=()).token_ids == out.token_ids
    assert reloaded.metadata["format"] == "keras-llm-model"
    assert reloaded.metadata["source"] == str(path)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(gguf_import.GGUFError, match="no such GGUF file"):
        gguf_import.load_gguf(str(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 13)
    with pytest.raises(gguf_import.GGUFError, match="not a readable GGUF"):
        gguf_import.load_gguf(str(junk))
