"""export/: SavedModels in TF Serving layout, checked from a process that
never imports keras_llm."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_llm
from keras_llm.export.saved_model import SIGNATURES, ExportError, chat_affixes, export_model
from keras_llm import cli
from tests.helpers import REPO, SMOLLM2_CHAT_TEMPLATE, byte_level_tokenizer, tiny_language_model

PROMPTS = ["hello", "a much longer prompt, with punctuation!", "ü"]
RUNNER = str(REPO / "tests" / "saved_model_runner.py")


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=4, source="tiny-test")


@pytest.fixture(scope="module")
def exported(lm, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    return export_model(lm, base, "tiny", max_new_tokens=8, progress=False)


def run_in_fresh_process(path, signature, inputs):
    proc = subprocess.run([sys.executable, RUNNER, path, signature, json.dumps(inputs)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=""), cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_serving_default_in_fresh_process_matches_keras_llm(lm, exported):
    result = run_in_fresh_process(exported, "serving_default", {"prompt": PROMPTS})
    assert result["imported_modules"] == []
    expected = lm.generate(PROMPTS, max_new_tokens=8)
    for row, completion in enumerate(expected):
        n = result["num_tokens"][row]
        assert result["token_ids"][row][:n] == completion.token_ids
        assert result["text"][row] == completion.text


def test_layout_metadata_and_serving_configs(exported):
    version_dir = exported
    model_dir = os.path.dirname(version_dir)
    assert os.path.basename(version_dir) == "1"
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    meta = json.load(open(os.path.join(version_dir, "assets", "keras_llm.json"), encoding="utf-8"))
    assert meta["keras_llm_version"] == keras_llm.__version__
    assert meta["source"] == "tiny-test" and meta["architecture"] == "llama"
    assert meta["dtype"] == "float32" and meta["context_length"] == 256 and meta["xla"] is True
    assert "quantization" in meta and "sparsity" in meta and "tokenizer" in meta
    assert os.path.isfile(os.path.join(version_dir, "assets", "tokenizer.json"))
    config = open(os.path.join(model_dir, "models.config"), encoding="utf-8").read()
    assert 'name: "tiny"' in config and "--xla_cpu_compilation_enabled" in config
    batching = open(os.path.join(model_dir, "batching_parameters.pbtxt"), encoding="utf-8").read()
    # tensorflow-serving-api ships no BatchingParameters proto: check the text form.
    fields = dict(re.findall(r"^(\w+) \{ value: (\d+) \}$", batching, flags=re.M))
    assert fields == {"max_batch_size": "16", "batch_timeout_micros": "5000",
                      "max_enqueued_batches": "64", "num_batch_threads": "1"}
    assert re.findall(r"^allowed_batch_sizes: (\d+)$", batching, flags=re.M) == ["1", "2", "4", "8", "16"]


EXPECTED_SIGNATURES = {
    "serving_default": ({"prompt": ("DT_STRING", [-1])},
                        {"text": ("DT_STRING", [-1]), "token_ids": ("DT_INT32", [-1, -1]),
                         "num_tokens": ("DT_INT32", [-1])}),
    "generate": ({"prompt": ("DT_STRING", [-1]), "max_new_tokens": ("DT_INT32", [-1]),
                  "temperature": ("DT_FLOAT", [-1]), "top_p": ("DT_FLOAT", [-1]),
                  "top_k": ("DT_INT32", [-1]), "seed": ("DT_INT32", [-1])},
                 {"text": ("DT_STRING", [-1]), "token_ids": ("DT_INT32", [-1, -1]),
                  "num_tokens": ("DT_INT32", [-1])}),
    "generate_ids": ({"token_ids": ("DT_INT32", [-1, -1]), "num_tokens": ("DT_INT32", [-1]),
                      "max_new_tokens": ("DT_INT32", [-1]), "temperature": ("DT_FLOAT", [-1]),
                      "top_p": ("DT_FLOAT", [-1]), "top_k": ("DT_INT32", [-1]),
                      "seed": ("DT_INT32", [-1])},
                     {"token_ids": ("DT_INT32", [-1, -1]), "num_tokens": ("DT_INT32", [-1])}),
    "score": ({"token_ids": ("DT_INT32", [-1, -1]), "num_tokens": ("DT_INT32", [-1])},
              {"log_probs": ("DT_FLOAT", [-1, -1]), "total_log_prob": ("DT_FLOAT", [-1])}),
}


def test_signature_defs(exported):
    from tensorflow.python.saved_model import loader_impl
    meta_graph = loader_impl.parse_saved_model(exported).meta_graphs[0]
    defs = meta_graph.signature_def
    assert set(EXPECTED_SIGNATURES) <= set(defs)

    from tensorflow.core.framework import types_pb2

    def describe(tensors):
        return {k: (types_pb2.DataType.Name(v.dtype), [d.size for d in v.tensor_shape.dim])
                for k, v in tensors.items()}

    for name, (inputs, outputs) in EXPECTED_SIGNATURES.items():
        assert describe(defs[name].inputs) == inputs, name
        assert describe(defs[name].outputs) == outputs, name
    shown = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli",
                            "show", "--all", "--dir", exported],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in shown.stdout
    assert "dtype: DT_STRING" in shown.stdout


def test_warmup_records_parse_and_succeed(exported):
    from tensorflow_serving.apis import prediction_log_pb2
    path = os.path.join(exported, "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    assert 0 < len(records) <= 1000
    loaded = tf.saved_model.load(exported)
    seen = set()
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        request = log.predict_log.request
        signature = request.model_spec.signature_name
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = loaded.signatures[signature](**inputs)
        assert all(v.shape[0] == next(iter(inputs.values())).shape[0] for v in outputs.values())
        seen.add(signature)
    assert seen == set(SIGNATURES)


def test_generate_per_row_sampling(lm, exported):
    loaded = tf.saved_model.load(exported)
    prompts = tf.constant(PROMPTS)
    rows = dict(max_new_tokens=tf.constant([3, 8, 0]), temperature=tf.constant([0.0, 0.9, 0.0]),
                top_p=tf.constant([1.0, 0.9, 1.0]), top_k=tf.constant([0, 20, 0]),
                seed=tf.constant([0, 7, 0]))
    out = loaded.signatures["generate"](prompt=prompts, **rows)
    counts = out["num_tokens"].numpy().tolist()
    assert counts[0] <= 3 and counts[2] == 0 and out["text"].numpy()[2] == b""
    greedy = lm.generate(PROMPTS[0], max_new_tokens=3)
    assert out["token_ids"].numpy()[0, :counts[0]].tolist() == greedy.token_ids
    sampled = lm.generate(PROMPTS[1], max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=20,
                          seed=7)
    assert out["token_ids"].numpy()[1, :counts[1]].tolist() == sampled.token_ids
    again = loaded.signatures["generate"](prompt=prompts, **rows)
    np.testing.assert_array_equal(again["token_ids"].numpy(), out["token_ids"].numpy())


def test_generate_ids_and_score(lm, exported):
    loaded = tf.saved_model.load(exported)
    prompts = [lm.encode(p) for p in PROMPTS]
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    n = len(prompts)
    out = loaded.signatures["generate_ids"](
        token_ids=ids, num_tokens=lengths, max_new_tokens=np.full([n], 5, np.int32),
        temperature=np.zeros([n], np.float32), top_p=np.ones([n], np.float32),
        top_k=np.zeros([n], np.int32), seed=np.zeros([n], np.int32))
    expected = lm.generate_ids(prompts, max_new_tokens=5)
    for row, completion in enumerate(expected):
        k = int(out["num_tokens"][row])
        assert out["token_ids"].numpy()[row, :k].tolist() == completion.token_ids
    scored = loaded.signatures["score"](token_ids=ids, num_tokens=lengths)
    for row, prompt in enumerate(prompts):
        logits = lm.model(tf.constant([prompt])).numpy()[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        want = [0.0] + [logp[t, prompt[t + 1]] for t in range(len(prompt) - 1)]
        got = scored["log_probs"].numpy()[row]
        np.testing.assert_allclose(got[:len(prompt)], want, atol=1e-4)
        assert np.all(got[len(prompt):] == 0)
        np.testing.assert_allclose(scored["total_log_prob"].numpy()[row], sum(want), atol=1e-3)


def test_versions_reexport_and_no_xla(lm, exported):
    base = os.path.dirname(os.path.dirname(exported))
    before = open(os.path.join(exported, "saved_model.pb"), "rb").read()
    second = export_model(lm, base, "tiny", max_new_tokens=8, jit_compile=False, progress=False)
    assert os.path.basename(second) == "2"
    assert open(os.path.join(exported, "saved_model.pb"), "rb").read() == before
    first = tf.saved_model.load(exported).signatures["serving_default"](prompt=tf.constant(PROMPTS))
    other = tf.saved_model.load(second).signatures["serving_default"](prompt=tf.constant(PROMPTS))
    np.testing.assert_array_equal(first["token_ids"].numpy(), other["token_ids"].numpy())
    np.testing.assert_array_equal(first["text"].numpy(), other["text"].numpy())
    meta = json.load(open(os.path.join(second, "assets", "keras_llm.json"), encoding="utf-8"))
    assert meta["xla"] is False
    assert _xla_functions(exported) and not _xla_functions(second)


def _xla_functions(path):
    """Names of the SavedModel's functions that must be XLA-compiled."""
    from tensorflow.python.saved_model import loader_impl
    library = loader_impl.parse_saved_model(path).meta_graphs[0].graph_def.library
    return [f.signature.name for f in library.function
            if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b]


def test_bad_arguments_leave_nothing_half_written(lm, exported, tmp_path, capsys):
    base = os.path.dirname(os.path.dirname(exported))
    listing = sorted(os.listdir(os.path.join(base, "tiny")))
    with pytest.raises(ExportError, match="already exists"):
        export_model(lm, base, "tiny", version=1, progress=False)
    with pytest.raises(ExportError, match="max_new_tokens"):
        export_model(lm, base, "tiny", max_new_tokens=100000, progress=False)
    assert sorted(os.listdir(os.path.join(base, "tiny"))) == listing
    locked = tmp_path / "locked"
    locked.write_text("a file, not a directory")
    with pytest.raises(ExportError, match="cannot create"):
        export_model(lm, locked, "tiny", progress=False)
    code = cli.main(["export", "--model", str(tmp_path / "missing.keras"),
                     "--model_base_path", str(tmp_path / "out"), "--model_name", "m"])
    err = capsys.readouterr().err
    assert code == 2 and "no such model file" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "m" / "1")


BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


WITH_BOS = dict(chat_template=BOS_TEMPLATE, bos_id=3,
                specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"))


@pytest.mark.parametrize("tokenizer", [dict(chat_template=SMOLLM2_CHAT_TEMPLATE),
                                       dict(WITH_BOS, add_bos=True), WITH_BOS,
                                       dict(chat_template=None)])
def test_chat_in_graph_gives_the_host_ids(tokenizer):
    from keras_llm.export.saved_model import GenerationModule

    chat_lm = tiny_language_model(seed=4, **tokenizer)
    module = GenerationModule(chat_lm, max_new_tokens=4, chat=True)
    in_graph = tf.function(module._prompts_to_ids)  # pylint: disable=protected-access
    got = in_graph(tf.constant(PROMPTS)).to_list()
    assert got == [chat_lm.encode(p, chat=True) for p in PROMPTS]
    if "bos_id" in tokenizer:  # bos once, from the template or from the tokenizer
        assert all(ids[0] == 3 and ids.count(3) == 1 for ids in got)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}", "2 times"),
    ("<|im_start|>assistant\n", "0 times"),
    ("{{ raise_exception('no single turns') }}", "no single turns"),
])
def test_chat_export_refuses_templates_it_cannot_split(template, message):
    with pytest.raises(ExportError, match=message):
        chat_affixes(byte_level_tokenizer(["h e"], chat_template=template))


def test_staging_left_by_a_killed_export_is_removed(tmp_path):
    """An export killed before it could clean up leaves `.staging-PID-*`; the
    next export removes it (its process is gone) and keeps a live one's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    model_dir = tmp_path / "m"
    stale = model_dir / f".staging-{dead.pid}-0123abcd"
    live = model_dir / f".staging-{os.getpid()}-4567ef"
    for path in (stale, live):
        (path / "variables").mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"half written")
    export_model(tiny_language_model(seed=2), tmp_path, "m", max_new_tokens=2, progress=False,
                 litert=None, warmup=False)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == [
        "1", "batching_parameters.pbtxt", "models.config"]
