"""Hugging Face checkpoints through the one builder, against transformers.

The fixtures under tests/data/hf/ and their `reference.json` (transformers'
logits and greedy ids) are written by `scripts/make_hf_fixtures.py`.
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from keras_llm import hf_import
from keras_llm.models import build_llama, config_from_model
from keras_llm.runtime.xla import XLABackend
from tests.helpers import REPO, engine_greedy

DATA = REPO / "tests" / "data" / "hf"
ARCHES = ["llama", "llama3", "mistral", "qwen2", "gemma", "phi3"]


def _reference(name):
    with open(DATA / name / "reference.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def loaded():
    return {name: hf_import.load_hf(DATA / name, progress=False)
            for name in ARCHES + ["llama-sharded", "llama-bf16"]}


@pytest.mark.parametrize("name", ARCHES + ["llama-sharded", "llama-bf16"])
def test_logits_and_greedy_ids_match_transformers(loaded, name):
    model, _, metadata = loaded[name]
    reference = _reference(name)
    logits = model(tf.constant([reference["prompt"]]), training=False).numpy()[0]
    expected = np.asarray(reference["logits"], np.float32)
    assert logits.shape == expected.shape
    assert np.max(np.abs(logits - expected)) < 1e-3
    tokens = engine_greedy(XLABackend.from_model(model, max_slots=1), [reference["prompt"]], 16)
    assert tokens[0] == reference["greedy"]
    assert metadata["architecture"] == name.split("-")[0].replace("llama3", "llama")


def test_architectures_are_options_of_the_one_builder(loaded):
    configs = {name: config_from_model(loaded[name][0]) for name in ARCHES}
    assert configs["qwen2"].attention_bias and not configs["llama"].attention_bias
    gemma = configs["gemma"]
    assert (gemma.mlp_activation, gemma.norm_weight_offset) == ("gelu_tanh", 1.0)
    assert gemma.embedding_scale == pytest.approx(32 ** 0.5)
    assert gemma.head_dim * gemma.num_query_heads != gemma.hidden_dim
    assert configs["mistral"].context_length == 64  # capped at its sliding window
    assert configs["llama3"].rope_scaling["factor"] == 8.0
    for name, config in configs.items():  # what the layers record rebuilds the model
        assert config_from_model(build_llama(config)) == config, name
    assert loaded["llama-bf16"][2]["source_tensor_types"] == {"BF16": 21}


@pytest.mark.parametrize("name", ["gemma", "llama3", "qwen2"])
def test_saved_model_keeps_the_options(loaded, name, tmp_path):
    import tf_keras as keras

    model = loaded[name][0]
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    ids = tf.constant([_reference(name)["prompt"]])
    np.testing.assert_array_equal(reloaded(ids).numpy(), model(ids).numpy())
    assert config_from_model(reloaded) == config_from_model(model)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tokenizer_json_gives_the_same_ids(loaded, name):
    _, tokenizer, metadata = loaded[name]
    assert tokenizer.pretokenizer == ("smollm" if name == "qwen2" else "gpt2")
    for text, ids in _reference(name)["tokenizer"].items():
        assert tokenizer.encode(text, add_bos=False) == ids, text
    assert tokenizer.eos_id == tokenizer.vocabulary.index("<|im_end|>")
    assert "<|im_start|>" in tokenizer.chat_template
    assert "tokenizer_unsupported" not in metadata


def test_no_tokenizer_means_ids_only(loaded):
    _, tokenizer, metadata = loaded["gemma"]
    assert tokenizer is None
    assert metadata["tokenizer_unsupported"] == "no tokenizer.json"


def _copy(name, tmp_path):
    target = tmp_path / name
    shutil.copytree(DATA / name, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    directory = _copy("llama", tmp_path)
    _edit_config(directory, architectures=["FalconForCausalLM"])
    with pytest.raises(hf_import.HFImportError, match="FalconForCausalLM.*LlamaForCausalLM"):
        hf_import.load_hf(directory, progress=False)


def test_rope_scaling_is_refused(tmp_path):
    directory = _copy("phi3", tmp_path)
    _edit_config(directory, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(hf_import.HFImportError, match="longrope"):
        hf_import.load_hf(directory, progress=False)


def test_a_missing_shard_is_named(tmp_path):
    directory = _copy("llama-sharded", tmp_path)
    os.remove(directory / "model-00002-of-00004.safetensors")
    assert hf_import.is_hf_dir(directory)
    with pytest.raises(hf_import.HFImportError, match="model-00002-of-00004"):
        hf_import.load_hf(directory, progress=False)


def test_a_wrong_shape_names_the_layer(tmp_path):
    directory = _copy("llama", tmp_path)
    _edit_config(directory, intermediate_size=48)
    with pytest.raises(hf_import.HFImportError, match="layer_0_mlp_.*expects"):
        hf_import.load_hf(directory, progress=False)


def test_missing_weights_are_named(tmp_path):
    directory = _copy("llama", tmp_path)
    _edit_config(directory, num_hidden_layers=3)
    with pytest.raises(hf_import.HFImportError, match="lacks weights.*layer_2_"):
        hf_import.load_hf(directory, progress=False)


def test_sliding_window_limits_the_context(tmp_path):
    with pytest.raises(hf_import.HFImportError, match="sliding window"):
        hf_import.load_hf(DATA / "mistral", context_length=100, progress=False)


def test_is_hf_dir_reads_what_the_directory_holds(tmp_path):
    assert hf_import.is_hf_dir(DATA / "qwen2")
    assert not hf_import.is_hf_dir(tmp_path)
    assert not hf_import.is_hf_dir(DATA / "qwen2" / "config.json")


@pytest.mark.parametrize("name", ["llama", "gemma"])  # with a tokenizer, and on ids alone
def test_load_dispatches_to_the_importer(name):
    import keras_llm

    lm = keras_llm.load(str(DATA / name), backend="xla", progress=False)
    reference = _reference(name)
    result = lm.generate_ids([reference["prompt"]], max_new_tokens=16, stop_ids=())
    assert result[0].token_ids == reference["greedy"]
    assert lm.metadata["source_format"] == "safetensors"


@pytest.mark.parametrize("name", ["qwen2", "gemma", "llama3"])
def test_litert_gives_the_transformers_greedy_ids(loaded, name, tmp_path):
    from keras_llm import litert
    from keras_llm.runtime.litert import LiteRTBackend

    model = loaded[name][0]
    reference = _reference(name)
    path = litert.convert(model, str(tmp_path / f"{name}.tflite"), batch_sizes=(1,),
                          max_length=64, prefill_length=16)
    runner = litert.LiteRTRunner(path, num_threads=1)
    expected = np.asarray(reference["logits"], np.float32)
    assert np.max(np.abs(runner(np.asarray([reference["prompt"]], np.int32))[0] - expected)) < 1e-3
    tokens = engine_greedy(LiteRTBackend(path, num_threads=1), [reference["prompt"]], 16)
    assert tokens[0] == reference["greedy"]


def test_smoothing_keeps_the_float_function_with_offset_norms(loaded):
    from keras_llm import litert

    model = loaded["gemma"][0]
    ids = np.random.default_rng(2).integers(0, 320, size=(2, 24)).astype(np.int32)
    smoothed = litert.smooth(model, ids, alpha=0.5)
    assert not np.allclose(smoothed.get_layer("layer_0_mlp_norm").get_weights()[0],
                           model.get_layer("layer_0_mlp_norm").get_weights()[0])
    np.testing.assert_allclose(smoothed(tf.constant(ids)).numpy(),
                               model(tf.constant(ids)).numpy(), atol=1e-4)


def test_int8_weights_refuse_a_bias_rather_than_drop_it(loaded):
    from keras_llm.optimize import quantize_model

    with pytest.raises(ValueError, match="bias"):
        quantize_model(loaded["qwen2"][0])


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_keras_hub_files_match_keras_hub(arch):
    from keras_llm import keras_hub_import

    path = REPO / "tests" / "data" / "keras_hub" / f"{arch}.keras"
    assert keras_hub_import.is_keras_hub_file(str(path))
    model, tokenizer, metadata = keras_hub_import.load_keras_hub(str(path))
    with open(path.with_suffix(".json"), encoding="utf-8") as handle:
        reference = json.load(handle)
    logits = model(tf.constant([reference["prompt"]])).numpy()[0]
    assert np.max(np.abs(logits - np.asarray(reference["logits"], np.float32))) < 1e-3
    tokens = engine_greedy(XLABackend.from_model(model, max_slots=1), [reference["prompt"]], 16)
    assert tokens[0] == reference["greedy"]
    assert (tokenizer, metadata["architecture"]) == (None, arch)
    import keras_llm  # `load` takes the same file (ids only: no tokenizer in it)
    lm = keras_llm.load(str(path), backend="xla", progress=False)
    assert lm.generate_ids([reference["prompt"]], max_new_tokens=16,
                           stop_ids=())[0].token_ids == reference["greedy"]


def test_new_layer_options_round_trip():
    from keras_llm.layers import RMSNorm, TokenEmbedding
    from tests.helpers import assert_layer_round_trip

    assert_layer_round_trip(RMSNorm(1e-6, weight_offset=1.0), tf.random.normal([2, 3, 8]))
    assert_layer_round_trip(TokenEmbedding(20, 8, scale=8 ** 0.5), tf.constant([[1, 2, 3]]))
    assert "scale" not in TokenEmbedding(20, 8).get_config()  # unscaled configs as before


@pytest.mark.parametrize("name", ["qwen2", "gemma"])
def test_clones_keep_bias_and_activation(loaded, name):
    from keras_llm.optimize._common import clone_with

    model = loaded[name][0]
    clone = clone_with(model, lambda fresh, original: None)
    ids = tf.constant([_reference(name)["prompt"]])
    np.testing.assert_array_equal(clone(ids).numpy(), model(ids).numpy())
    assert config_from_model(clone) == config_from_model(model)
