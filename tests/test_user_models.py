"""A user's own Keras causal LM generates through the engine, the CLI, the
export and the server, with exactly the tokens of the user's own
`model.predict` greedy loop (models in `tests/user_layers.py`)."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
import tokenizers
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import keras_llm
from keras_llm import cli
from keras_llm.export.saved_model import export_model
from keras_llm.runtime.engine import Engine, EngineConfig as RuntimeConfig, InvalidRequest
from keras_llm.runtime.recompute import RecomputeBackend, last_position_plan
from keras_llm.serving.engine import EngineConfig
from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc
from keras_llm.serving.server import Server
from tests import user_layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "saved_model_runner.py")
VOCAB = 128
NEW = 32
PROMPT = "w5 w17 w3 w99 w42 w7 w1 w8"
MODELS = {  # name: (builder, seed, fixed input length of the reference loop)
    "mini_gpt": (user_layers.mini_gpt, 1, 64),
    "builtin_gpt": (user_layers.builtin_gpt, 2, None),
    "small_llama": (user_layers.small_llama, 3, None),
}
# The LiteRT file each decodes with, a KV cache in each: the hand-written
# Llama maps onto build_llama (keras_llm.llama_map); both GPTs are converted
# with the cache in their MultiHeadAttention layers (runtime.mha_cache),
# keras.io's inside its own TransformerBlock.
FILES = {"mini_gpt": "mha_cache.tflite", "builtin_gpt": "mha_cache.tflite",
         "small_llama": "float32.tflite"}
DEADLINE = 120


def word_level_tokenizer(path):
    """A WordLevel `tokenizer.json` (Hugging Face) with one word per model id."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module", autouse=True)
def _own_home(tmp_path_factory):
    """The LiteRT files converted for these throwaway models (the mapped
    Llama's) go to a temporary KERAS_LLM_HOME, not the user's cache."""
    before = os.environ.get("KERAS_LLM_HOME")
    os.environ["KERAS_LLM_HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    if before is None:
        os.environ.pop("KERAS_LLM_HOME")
    else:
        os.environ["KERAS_LLM_HOME"] = before


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each model saved as .keras (builtin_gpt also as .h5), its reference
    tokens, and the tokenizer file."""
    root = tmp_path_factory.mktemp("user_models")
    tokenizer = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"  # not beside the models
    prompt = word_level_tokenizer(tokenizer).encode(PROMPT).ids
    out = {"tokenizer": str(tokenizer), "prompt": prompt, "models": {}}
    for name, (build, seed, pad_to) in MODELS.items():
        model = build(vocab_size=VOCAB, seed=seed)
        path = str(root / f"{name}.keras")
        model.save(path)
        if name == "builtin_gpt":
            model.save(str(root / f"{name}.h5"))
        out["models"][name] = {"path": path,
                               "reference": user_layers.greedy_predict(model, prompt, NEW, pad_to)}
    return out


@pytest.fixture(scope="module")
def exports(files, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    paths = {}
    for name, entry in files["models"].items():
        lm = keras_llm.load(entry["path"], tokenizer=files["tokenizer"])
        paths[name] = export_model(lm, base, name, max_new_tokens=NEW, progress=False)
    return base, paths


@pytest.mark.parametrize("name", list(MODELS))
def test_language_model_gives_the_predict_loop_tokens(files, name):
    entry = files["models"][name]
    lm = keras_llm.load(entry["path"])  # no tokenizer beside it: ids only
    assert lm.host_tokenizer is None and lm.generic
    [completion] = lm.generate_ids([files["prompt"]], max_new_tokens=NEW)
    assert completion.token_ids == entry["reference"]
    assert lm.engine.backend.capabilities.name == "litert"
    assert os.path.basename(lm.engine.backend.runner.path) == FILES[name]
    streamed = [ids for item in lm.stream(files["prompt"], max_new_tokens=NEW)
                if isinstance(item, tuple) for ids in item[1]]
    assert streamed == entry["reference"]
    with pytest.raises(ValueError, match="no tokenizer"):
        lm.generate("w1 w2")


def test_h5_file_and_any_tokenizer_object(files):
    entry = files["models"]["builtin_gpt"]
    h5 = entry["path"][:-len(".keras")] + ".h5"
    tok = tokenizers.Tokenizer.from_file(files["tokenizer"])
    lm = keras_llm.load(h5, tokenizer=tok)
    completion = lm.generate(PROMPT, max_new_tokens=NEW)
    assert completion.token_ids == entry["reference"]
    assert completion.text == tok.decode(entry["reference"])
    deltas = [item[0] for item in lm.stream(PROMPT, max_new_tokens=NEW) if isinstance(item, tuple)]
    assert "".join(deltas) == completion.text


def test_load_model_with_custom_objects(files):
    model = keras_llm.load_model(files["models"]["mini_gpt"]["path"],
                                 custom_objects=user_layers.custom_objects)
    assert model.output_shape == (None, 64, VOCAB)


@pytest.mark.parametrize("name", list(MODELS))
def test_cli_generate(files, name, capsys):
    code = cli.main(["generate", "--model", files["models"][name]["path"], "--custom-objects",
                     "tests.user_layers", "--tokenizer", files["tokenizer"], "--prompt", PROMPT,
                     "--max-new-tokens", str(NEW), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)
    assert record["prompt_token_ids"] == files["prompt"]
    assert record["token_ids"] == files["models"][name]["reference"]


def test_cli_generate_in_a_subprocess_with_a_custom_objects_file(files):
    """The console path: the user's layers come from a .py file given by path."""
    result = subprocess.run(
        [sys.executable, "-m", "keras_llm.cli", "generate", "--model",
         files["models"]["mini_gpt"]["path"], "--custom-objects",
         os.path.join(REPO, "tests", "user_layers.py"), "--tokenizer", files["tokenizer"],
         "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--json"],
        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(files["tokenizer"]),
        env={**os.environ, "PYTHONPATH": REPO}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["token_ids"] == files["models"]["mini_gpt"]["reference"]


@pytest.mark.parametrize("name", list(MODELS))
def test_export_generate_ids_without_keras_llm(files, exports, name):
    _, paths = exports
    prompt = files["prompt"]
    inputs = {"token_ids": [prompt], "num_tokens": [len(prompt)], "max_new_tokens": [NEW],
              "temperature": [0.0], "top_p": [1.0], "top_k": [0], "seed": [0]}
    result = subprocess.run([sys.executable, RUNNER, paths[name], "generate_ids",
                             json.dumps(inputs)], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["imported_modules"] == []
    assert outputs["num_tokens"] == [NEW]
    assert outputs["token_ids"][0] == files["models"][name]["reference"]


def test_export_score_and_metadata(files, exports):
    _, paths = exports
    loaded = tf.saved_model.load(paths["small_llama"])
    assert set(loaded.signatures) == {"generate_ids", "score"}  # no in-graph tokenizer
    ids = files["prompt"] + files["models"]["small_llama"]["reference"][:4]
    scores = loaded.signatures["score"](token_ids=tf.constant([ids]),
                                        num_tokens=tf.constant([len(ids)]))
    model = keras_llm.load_model(files["models"]["small_llama"]["path"])
    logits = model(np.array([ids]))[0].numpy()
    expected = tf.nn.log_softmax(logits[:-1]).numpy()[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(scores["log_probs"].numpy()[0, 1:], expected, atol=1e-4)
    with open(os.path.join(paths["small_llama"], "assets", "keras_llm.json"),
              encoding="utf-8") as handle:
        metadata = json.load(handle)
    assert metadata["backend"] == "recompute" and metadata["signatures"] == ["generate_ids",
                                                                              "score"]
    # The LiteRT file the model decodes with, which keras-llm serve runs.
    for name in MODELS:
        with open(os.path.join(paths[name], "assets", "keras_llm.json"), encoding="utf-8") as f:
            record = json.load(f)["litert"]
        assert record["files"] == [f"assets.extra/litert/{FILES[name]}"]
        assert record["kind"] == "cache" and record["cache"]["num_layers"] == 2
        assert os.path.isfile(os.path.join(paths[name], record["file"]))


def test_failed_export_leaves_nothing(files, tmp_path):
    lm = keras_llm.load(files["models"]["mini_gpt"]["path"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        export_model(lm, tmp_path, "too_long", max_new_tokens=64, progress=False)
    assert os.listdir(tmp_path) == []


def test_serve_answers_generate_and_predict_with_ids(files, exports):
    base, _ = exports
    config = EngineConfig(max_slots=4, max_queue=8, max_length=128)
    server = Server({name: str(base / name) for name in MODELS}, port=0, engine_config=config,
                    poll_seconds=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        generation = generation_pb2_grpc.GenerationStub(channel)
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        prompt = files["prompt"]
        tok = tokenizers.Tokenizer.from_file(files["tokenizer"])
        for name in MODELS:
            reference = files["models"][name]["reference"]
            request = generation_pb2.GenerateRequest(
                model_name=name, sampling=generation_pb2.SamplingOptions(max_new_tokens=NEW))
            request.ids.ids.extend(prompt)
            summary = [r.summary for r in generation.Generate(request, timeout=DEADLINE)
                       if r.HasField("summary")][0]
            assert list(summary.token_ids) == reference
            text = generation_pb2.GenerateRequest(
                model_name=name, text=PROMPT,
                sampling=generation_pb2.SamplingOptions(max_new_tokens=NEW))
            summary = [r.summary for r in generation.Generate(text, timeout=DEADLINE)
                       if r.HasField("summary")][0]
            assert list(summary.token_ids) == reference
            assert summary.text == tok.decode(reference)
            predict = predict_pb2.PredictRequest()
            predict.model_spec.name, predict.model_spec.signature_name = name, "generate_ids"
            values = {"token_ids": np.array([prompt], np.int32),
                      "num_tokens": np.array([len(prompt)], np.int32),
                      "max_new_tokens": np.array([NEW], np.int32),
                      "temperature": np.zeros([1], np.float32), "top_p": np.ones([1], np.float32),
                      "top_k": np.zeros([1], np.int32), "seed": np.zeros([1], np.int32)}
            for key, value in values.items():
                predict.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            response = prediction.Predict(predict, timeout=DEADLINE)
            assert tf.make_ndarray(response.outputs["token_ids"])[0].tolist() == reference
            backend = server.servables.lookup(name).engine.engine.backend
            assert os.path.basename(backend.runner.path) == FILES[name]  # the cache, on LiteRT
    finally:
        channel.close()
        server.drain(0)


def test_non_causal_model_is_refused():
    model = user_layers.builtin_gpt(vocab_size=VOCAB, causal=False)
    with pytest.raises(ValueError, match="not causal"):
        RecomputeBackend.from_model(model)


def test_wrong_output_shape_is_refused():
    inputs = keras.layers.Input(shape=(None,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(VOCAB)(pooled))
    with pytest.raises(ValueError, match=r"\(batch, time, vocabulary\)"):
        keras_llm.LanguageModel(model).generate_ids([[1, 2]], max_new_tokens=2)


def test_prompt_past_max_positions_is_refused(files):
    lm = keras_llm.load(files["models"]["builtin_gpt"]["path"])  # positions: Embedding(64)
    assert lm.engine.max_length == 64
    with pytest.raises(InvalidRequest, match="limit of 64 positions"):
        lm.generate_ids([list(range(1, 60))], max_new_tokens=8)
    lm = keras_llm.LanguageModel(keras_llm.load_model(files["models"]["small_llama"]["path"]),
                                 max_positions=48)
    assert lm.engine.backend.capabilities.max_length == 48
    with pytest.raises(InvalidRequest, match="limit of 48 positions"):
        lm.generate_ids([list(range(1, 40))], max_new_tokens=16)


def test_adapter_streams_multi_byte_characters_whole():
    """A byte-level BPE without merges splits each non-ASCII character over
    several tokens: streamed deltas never show half a character."""
    from keras_llm.runtime.tokenizer import bytes_to_unicode
    from keras_llm.runtime.user_tokenizer import TokenizerAdapter

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode())}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    adapter = TokenizerAdapter(tok)
    text = "héllo wörld 日本 🙂"
    ids = adapter.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    decoder = adapter.stream_decoder()
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert adapter.vocabulary_size == 256 and adapter.stop_ids == []


def _generate(backend, prompts):
    engine = Engine(backend, None, RuntimeConfig(max_slots=4,
                                                 max_length=backend.capabilities.max_length))
    return [r.token_ids for r in engine.generate(
        prompts, keras_llm.runtime.params.SamplingParams(max_new_tokens=NEW))]


@pytest.mark.parametrize("name", ["mini_gpt", "builtin_gpt"])
def test_generic_path_runs_on_litert_with_the_predict_loop_tokens(files, name):
    """The recompute path (what a model with no KV-cache path decodes with)
    runs its forward pass on LiteRT, converted once per model file, and
    gives the predict loop's tokens, alone and in a ragged batch; with
    backend="xla" it runs the TensorFlow function, with the same tokens."""
    entry, prompt = files["models"][name], files["prompt"]
    backend = keras_llm.load(entry["path"]).recompute_backend()
    assert backend.litert is not None and backend.litert.row_counts == (1, 2, 4, 8, 16)
    checked = backend.litert.calls  # the check against the TensorFlow function
    assert _generate(backend, [prompt]) == [entry["reference"]]
    assert backend.litert.calls - checked == NEW  # the prompt, then NEW - 1 steps: all LiteRT
    other = [7, 3, 9]
    [alone] = _generate(backend, [other])
    assert _generate(backend, [prompt, other]) == [entry["reference"], alone]
    built = os.path.getmtime(backend.litert.path)
    again = keras_llm.load(entry["path"]).recompute_backend()
    assert again.litert.path == backend.litert.path  # the file kept beside the model's artifacts
    assert os.path.getmtime(again.litert.path) == built
    xla = keras_llm.load(entry["path"], backend="xla").recompute_backend()
    assert xla.litert is None
    assert _generate(xla, [prompt, other]) == [entry["reference"], alone]


def _at_last(plan):
    """The layers a plan runs on the last position only, in order."""
    return [node.layer.name for node in plan.nodes if id(node) in plan.last_nodes]


def _plan_logits(model, plan, length=20, last=(19, 4, 11), seed=0):
    """`(plan's logits, the model's own at those positions)` on random ids."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, (len(last), length)).astype(np.int32)
    want = tf.gather(model(ids), np.array(last, np.int32), batch_dims=1)
    return plan(tf.constant(ids), tf.constant(last, tf.int32)).numpy(), want.numpy()


def test_layers_after_the_last_attention_run_at_the_last_position_only():
    """builtin_gpt: its last attention's query, the adds, norms, MLP and
    head run on each row's last position (attention_0 and everything before
    on the whole sequence), and the logits are the model's own there, rows
    of different lengths in one batch. The MHA cache's plan runs every
    attention layer whole (they write the cache)."""
    model = user_layers.builtin_gpt(vocab_size=VOCAB, seed=2)
    plan = last_position_plan(model)
    ran = _at_last(plan)
    assert ran[0] == "attention_1" and len(ran) == 8
    assert [type(model.get_layer(name)).__name__ for name in ran[1:]] == [
        "Add", "LayerNormalization", "Dense", "Dense", "Add", "LayerNormalization", "Dense"]
    got, want = _plan_logits(model, plan)
    np.testing.assert_allclose(got, want, atol=1e-4)
    cached = last_position_plan(model, attention=False)  # mha_cache's: the layers after it
    assert _at_last(cached) == ran[1:]
    np.testing.assert_allclose(_plan_logits(model, cached)[0], want, atol=1e-4)


class _RunningSum(keras.layers.Dense):
    """A Dense whose output mixes positions (a running sum over time):
    causal, not position-wise, so a subclass of Dense is not taken as one."""

    def call(self, inputs):
        return tf.cumsum(super().call(inputs), axis=1)


def test_a_layer_that_mixes_positions_runs_on_the_whole_sequence():
    """After the last attention, a causal Conv1D and a Dense subclass that
    sums over time need every position: only the layers after them (and
    not they) run on the last position, and the logits stay the model's."""
    keras.utils.set_random_seed(4)
    inputs = keras.layers.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 16)(inputs)
    x = x + keras.layers.MultiHeadAttention(2, 8)(x, x, use_causal_mask=True)
    x = keras.layers.Conv1D(16, 3, padding="causal", name="conv")(x)
    x = keras.layers.Dense(16, name="mlp")(x)
    x = _RunningSum(16, name="running_sum")(x)
    model = keras.Model(inputs, keras.layers.Dense(VOCAB, name="head")(
        keras.layers.LayerNormalization(name="norm")(x)))
    plan = last_position_plan(model)
    assert _at_last(plan) == ["norm", "head"]
    got, want = _plan_logits(model, plan)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_tensorflow_element_wise_ops_run_at_the_last_position():
    """`x + attention` and `tf.nn.gelu(x)` written on Keras tensors (TFOpLambda
    layers) run on the last position; `tf.cumsum` does not."""
    keras.utils.set_random_seed(6)
    inputs = keras.layers.Input(shape=(None,))  # float ids, as many users write them
    x = keras.layers.Embedding(VOCAB, 16)(inputs)
    x = x + keras.layers.MultiHeadAttention(2, 8, name="attention")(x, x, use_causal_mask=True)
    x = tf.nn.gelu(keras.layers.Dense(32, name="up")(x) * 0.5)
    x = keras.layers.Dense(16, name="down")(x)
    model = keras.Model(inputs, keras.layers.Dense(VOCAB, name="head")(x))
    plan = last_position_plan(model)
    assert _at_last(plan)[0] == "attention" and len(_at_last(plan)) == 7
    got, want = _plan_logits(model, plan)
    np.testing.assert_allclose(got, want, atol=1e-4)
    summed = keras.Model(inputs, keras.layers.Dense(VOCAB, name="head_2")(
        tf.cumsum(model.get_layer("down").output, axis=1)))
    assert _at_last(last_position_plan(summed)) == ["head_2"]


def test_a_model_with_a_keras_mask_runs_whole():
    """Masks (mask_zero) travel with tensors: no layer runs on one position."""
    keras.utils.set_random_seed(5)
    inputs = keras.layers.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inputs)
    x = keras.layers.MultiHeadAttention(2, 8)(x, x, use_causal_mask=True)
    model = keras.Model(inputs, keras.layers.Dense(VOCAB)(x))
    assert last_position_plan(model) is None


def test_a_model_in_memory_converts_to_a_temporary_file_gone_with_it(files):
    model = keras_llm.load_model(files["models"]["builtin_gpt"]["path"])
    backend = keras_llm.LanguageModel(model).recompute_backend()
    path = backend.litert.path
    assert os.path.isfile(path)
    assert _generate(backend, [files["prompt"]]) == [files["models"]["builtin_gpt"]["reference"]]
    del backend
    gc.collect()
    assert not os.path.exists(os.path.dirname(path))


@keras.saving.register_keras_serializable(package="tests")
class NumpyIdentity(keras.layers.Layer):
    """Its input, through numpy: TensorFlow runs it; neither XLA nor LiteRT's
    converter can."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def test_a_model_litert_cannot_convert_recomputes_with_tensorflow(caplog):
    keras.utils.set_random_seed(0)
    inputs = keras.layers.Input(shape=(None,), dtype="int32")
    x = NumpyIdentity()(keras.layers.Embedding(VOCAB, 16)(inputs))
    x = keras.layers.Conv1D(16, 3, padding="causal", activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(VOCAB)(x))
    lm = keras_llm.LanguageModel(model, max_positions=64)
    with caplog.at_level(logging.WARNING, logger="keras_llm"):
        [completion] = lm.generate_ids([[5, 1, 9]], max_new_tokens=6)
    backend = lm.engine.backend
    assert backend.capabilities.name == "recompute" and backend.litert is None
    assert "no LiteRT recompute file" in caplog.text
    assert completion.token_ids == user_layers.greedy_predict(model, [5, 1, 9], 6)
    with pytest.raises(Exception):  # noqa: B017  (the converter's own error)
        keras_llm.LanguageModel(model, max_positions=64, backend="litert").recompute_backend()


def _convolution_lm(seed=0):
    """A causal LM with no attention (a causal Conv1D): no KV-cache path."""
    keras.utils.set_random_seed(seed)
    inputs = keras.layers.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 16)(inputs)
    x = keras.layers.Conv1D(16, 3, padding="causal", activation="relu")(x)
    x = keras.layers.Conv1D(16, 3, padding="causal", activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(VOCAB)(x), name="convolution_lm")


def test_a_model_without_a_cache_exports_and_serves_its_litert_forward_pass(files, tmp_path):
    model = _convolution_lm()
    path = str(tmp_path / "convolution.keras")
    model.save(path)
    prompt = files["prompt"]
    reference = user_layers.greedy_predict(model, prompt, 8)
    lm = keras_llm.load(path, max_positions=64)
    export = export_model(lm, tmp_path / "exports", "convolution", max_new_tokens=8,
                          progress=False)
    with open(os.path.join(export, "assets", "keras_llm.json"), encoding="utf-8") as handle:
        record = json.load(handle)["litert"]
    assert record["kind"] == "recompute" and record["files"] == [
        "assets.extra/litert/recompute.tflite"]
    server = Server({"convolution": str(tmp_path / "exports" / "convolution")}, port=0,
                    engine_config=EngineConfig(max_slots=2, max_length=64), poll_seconds=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        request = generation_pb2.GenerateRequest(
            model_name="convolution", sampling=generation_pb2.SamplingOptions(max_new_tokens=8))
        request.ids.ids.extend(prompt)
        stub = generation_pb2_grpc.GenerationStub(channel)
        summary = [r.summary for r in stub.Generate(request, timeout=DEADLINE)
                   if r.HasField("summary")][0]
        assert list(summary.token_ids) == reference
        litert = server.servables.lookup("convolution").engine.engine.backend.litert
        assert litert is not None and litert.calls >= 8  # the forward passes ran on LiteRT
    finally:
        channel.close()
        server.drain(0)


def test_a_kept_litert_file_that_no_longer_matches_is_converted_again(files, tmp_path):
    """The kept file's key sees the weights file, not the layers' code: a
    kept file that fails the check is converted again, not just skipped."""
    entry = files["models"]["builtin_gpt"]
    mine, other = str(tmp_path / "mine.keras"), str(tmp_path / "other.keras")
    user_layers.builtin_gpt(vocab_size=VOCAB, seed=2).save(mine)  # the fixture's builtin_gpt
    user_layers.builtin_gpt(vocab_size=VOCAB, seed=9).save(other)
    kept = keras_llm.load(mine).engine.backend.runner.path
    shutil.copyfile(keras_llm.load(other).engine.backend.runner.path, kept)  # a stale file
    lm = keras_llm.load(mine)
    assert lm.engine.backend.capabilities.name == "litert"  # converted again, not XLA
    [completion] = lm.generate_ids([files["prompt"]], max_new_tokens=NEW)
    assert completion.token_ids == entry["reference"]
