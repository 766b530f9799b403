"""keras-llm optimize end to end on tiny models: output directory, report,
sparsity and int8 on disk, distilled student, 16-bit models, CLI errors,
interruption."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest
import tensorflow as tf

import keras_llm
from keras_llm import cli, saving
from keras_llm.models import config_from_model
from keras_llm.optimize import OptimizeOptions, cast_model, measure_sparsity, run
from keras_llm.optimize.evaluation import eval_batches, eval_text
from keras_llm.optimize.report import ROW_KEYS
from tests.helpers import REPO, byte_level_tokenizer, tiny_model

# Small everything: a few seconds per measured row.
FAST = dict(eval_tokens=128, eval_sequence_length=64, train_tokens=1024, sequence_length=32,
            batch_size=2, speed_new_tokens=4, speed_repeats=1, speed_prompt_tokens=8,
            verbose=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny"
    tokenizer = byte_level_tokenizer(["h e", "l l", "he ll", "t h", "th e"])
    model = tiny_model(seed=3, vocabulary_size=tokenizer.vocabulary_size)
    saving.save_model_dir(directory, model, tokenizer, {"source": "test", "architecture": "llama"})
    return str(directory)


def _h5_arrays(model_file, tmp_path):
    """{dataset path: array} of a saved `.keras` file's weights (sparse or not)."""
    with zipfile.ZipFile(model_file) as archive:
        path = saving.extract_weights(archive, str(tmp_path / "weights.h5"))
    arrays = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                          if isinstance(item, h5py.Dataset) else None)
    return arrays


def test_eval_text_is_documented_natural_language():
    text = eval_text()
    assert len(text) > 20000 and text.isascii()
    readme = open(os.path.join(REPO, "keras_llm", "data", "README.md"), encoding="utf-8").read()
    assert "#71688" in readme and text[:40] in text
    tokenizer = byte_level_tokenizer(["h e"])
    batches = eval_batches(tokenizer, tokens=512, sequence_length=128, batch_size=2)
    assert [b.shape for b in batches] == [(2, 129), (2, 129)]
    # Windows are consecutive: each starts where the previous one ended.
    assert batches[0][1, 0] == batches[0][0, -1]
    with pytest.raises(ValueError, match="scorable tokens"):
        eval_batches(tokenizer, tokens=10 ** 7)


def test_prune_recover_int8_report_and_output(model_dir, tmp_path):
    out, report_path = tmp_path / "out", tmp_path / "reports" / "r.json"
    report = run(model_dir, out, report_path, prune=0.5, recovery_steps=3, quantize="int8",
                 **FAST)
    # The output directory loads, generates and is int8 on disk.
    lm = keras_llm.load(str(out))
    assert lm.generate_ids([[5, 6, 7]], max_new_tokens=3)[0].token_ids
    metadata = json.load(open(out / "keras_llm.json"))
    assert metadata["quantization"] == "int8-per-channel-weights"
    assert metadata["optimize"]["steps"] == ["pruned-50%", "int8"]
    # Pruned: the weights are packed sparse, and load exactly (above).
    assert saving.WEIGHTS_SPARSE in zipfile.ZipFile(out / "model.keras").namelist()
    arrays = _h5_arrays(out / "model.keras", tmp_path)
    int8 = {k: v for k, v in arrays.items() if v.dtype == np.int8}
    assert len(int8) == 14  # every projection kernel of both blocks
    # Symmetric int8 keeps pruning's zeros: at least half of each kernel is 0.
    assert all(np.mean(v == 0) >= 0.5 for v in int8.values())

    # Report: stable row keys, one row per step, the Markdown beside the JSON.
    on_disk = json.load(open(report_path))
    assert on_disk == json.loads(json.dumps(report))
    names = [row["variant"] for row in on_disk["rows"]]
    assert names[:3] == ["original", "pruned-50%", "pruned-50%+int8"]
    for row in on_disk["rows"]:
        assert set(ROW_KEYS) <= set(row)
        assert row["gzip_bytes"] > 0 and row["size_bytes"] > 0
        assert row["decode_tps_b1"] > 0 and row["decode_tps_b16"] > 0
    original, pruned = on_disk["rows"][0], on_disk["rows"][1]
    assert original["mean_kl"] == pytest.approx(0, abs=1e-9)
    assert original["top1_agreement"] == 1.0
    assert pruned["nonzero_params"] < original["nonzero_params"]
    assert pruned["size_bytes"] < 0.85 * original["size_bytes"]  # stored sparse
    assert pruned["params"] - pruned["nonzero_params"] >= \
        0.5 * sum(v.size for v in int8.values()) - 1
    assert on_disk["eval"]["text"].startswith("B. M. Gardiner")
    assert on_disk["eval"]["positions"] == 128
    assert on_disk["machine"]["cores"] >= 1 and on_disk["machine"]["tensorflow"]
    assert any(t["target"].startswith("50% unstructured") for t in on_disk["targets"])
    markdown = open(str(report_path)[:-5] + ".md").read()
    assert "| variant |" in markdown and "pruned-50%+int8" in markdown
    assert not [p for p in os.listdir(tmp_path) if "staging" in p]


def test_int8_tflite_has_int8_weights(tmp_path):
    pytest.importorskip("keras_llm.litert")
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel

    # Kernels of >= 1024 values: the converter leaves smaller ones float.
    tokenizer = byte_level_tokenizer(["h e", "l l"])
    wide = tiny_model(seed=6, vocabulary_size=tokenizer.vocabulary_size, hidden_dim=64,
                      head_dim=16, intermediate_dim=128)
    lm = keras_llm.LanguageModel(wide, tokenizer, {"source": "test"})
    out = tmp_path / "out"
    report = run(lm, out, tmp_path / "r.json", quantize="int8", **{**FAST, "speed": False})
    assert (out / "model.tflite").is_file()
    details = Interpreter(model_path=str(out / "model.tflite")).get_tensor_details()
    int8_values = sum(int(np.prod(d["shape"])) for d in details
                      if d["dtype"] == np.int8 and len(d["shape"]) == 2)
    # Every projection (some stacked into one matmul) and the embedding.
    assert int8_values >= sum(int(np.prod(w.shape)) for w in wide.weights if len(w.shape) == 2)
    row = report["rows"][-1]
    assert row["variant"] == "int8-litert" and row["runtime"] == "litert-xnnpack"
    assert row["mean_kl"] < 0.5 and row["size_bytes"] == os.path.getsize(out / "model.tflite")


def test_two_four_and_unstructured_sparsity_in_saved_file(model_dir, tmp_path):
    run(model_dir, tmp_path / "a", tmp_path / "a.json", prune=0.5, structure="2:4",
        **{**FAST, "speed": False})
    stored = measure_sparsity(str(tmp_path / "a" / "model.keras"))
    assert stored["two_four"] and stored["overall"] == pytest.approx(0.5)
    details = json.load(open(tmp_path / "a.json"))["details"]["pruning"]
    # SparseGPT by default, calibrated on the teacher's text (at least the
    # 1024 tokens asked, in windows of 32), not on the evaluation text.
    assert details["method"] == "sparsegpt"
    calibration = details["calibration"]
    assert calibration["sequences"] >= 32 and calibration["tokens"] == 32 * calibration["sequences"]
    # A recovery fine-tune shorter than TF-MOT's 100-step mask frequency
    # still leaves every kernel at least 50% zeros.
    run(model_dir, tmp_path / "b", tmp_path / "b.json", prune=0.5, recovery_steps=4,
        **{**FAST, "speed": False})
    stored = measure_sparsity(str(tmp_path / "b" / "model.keras"))
    assert min(layer["sparsity"] for layer in stored["layers"].values()) >= 0.5
    assert json.load(open(tmp_path / "b" / "keras_llm.json"))["sparsity"]["min_layer"] >= 0.5


def test_distilled_student_is_smaller_resumes_and_exports(model_dir, tmp_path):
    from keras_llm.export.saved_model import export_model  # pylint: disable=import-outside-toplevel

    logdir = tmp_path / "logs"
    report = run(model_dir, tmp_path / "student", tmp_path / "s.json", distill_layers=1,
                 distill_steps=2, logdir=str(logdir), **{**FAST, "speed": False})
    teacher = keras_llm.load(model_dir).model
    student = keras_llm.load(str(tmp_path / "student")).model
    assert config_from_model(student).num_layers == 1 <= config_from_model(teacher).num_layers // 2
    assert student.count_params() < teacher.count_params()
    assert os.path.isfile(logdir / "checkpoints" / "checkpoint")
    assert os.listdir(logdir / "distill")  # TensorBoard event file
    assert report["rows"][1]["variant"] == "student-1L"
    assert any(t["target"].startswith("student") for t in report["targets"])
    # Same logdir, more steps: continues from the checkpoint.
    again = run(model_dir, tmp_path / "student2", tmp_path / "s2.json", distill_layers=1,
                distill_steps=3, logdir=str(logdir), **{**FAST, "speed": False})
    assert again["details"]["distillation"]["resumed_from"] == 2
    path = export_model(str(tmp_path / "student"), str(tmp_path / "serving"), "student",
                        max_new_tokens=4, jit_compile=False, warmup=False, progress=False)
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_models_keep_float32_logits_and_round_trip(dtype, tmp_path):
    model = tiny_model(seed=5)
    half = cast_model(model, dtype)
    assert {w.dtype.name for w in half.weights} == {dtype}
    ids = tf.constant([[3, 14, 15, 92, 65]])
    logits = half(ids)
    assert logits.dtype == tf.float32
    reference = model(ids).numpy()
    assert np.max(np.abs(logits.numpy() - reference)) < 0.05 * np.max(np.abs(reference))
    path = str(tmp_path / "m.keras")
    half.save(path)
    loaded = keras_llm.load_model(path)
    np.testing.assert_array_equal(loaded(ids).numpy(), logits.numpy())
    from keras_llm.runtime.xla import XLABackend  # pylint: disable=import-outside-toplevel
    from tests.helpers import engine_greedy  # pylint: disable=import-outside-toplevel

    assert len(engine_greedy(XLABackend.from_model(loaded), [[3, 14, 15]], 3)[0]) == 3
    with pytest.raises(ValueError, match="dtype"):
        cast_model(model, "int4")


def test_cli_optimize_writes_output_and_report(capsys, model_dir, tmp_path):
    code = cli.main(["optimize", "--model", model_dir, "--output", str(tmp_path / "o"),
                     "--report", str(tmp_path / "r.json"), "--dtype", "bfloat16",
                     "--no-speed", "--eval-tokens", "64"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(tmp_path / "o")
    rows = json.load(open(tmp_path / "r.json"))["rows"]
    assert [r["variant"] for r in rows] == ["original", "bfloat16"]
    assert rows[1]["decode_tps_b1"] is None and rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert "[optimize]" in err


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to do"),
    (["--prune", "1.5"], "--prune must be a sparsity in (0, 1)"),
    (["--prune", "0.3", "--structure", "2:4"], "2:4 means 50% sparsity"),
    (["--structure", "3:4", "--prune", "0.5"], "--structure must be one of"),
    (["--prune", "0.5", "--prune-method", "obs"], "--prune-method must be one of"),
    (["--dtype", "bfloat16", "--quantize", "int8"], "do not combine"),
    (["--quantize", "qat"], "--recovery-steps"),
    (["--quantize", "int2"], "--quantize must be one of"),
    (["--distill-layers", "2"], "at most half"),
    (["--prune", "0.5", "--report", "r.txt"], "must be a .json path"),
])
def test_cli_errors_are_one_line(capsys, model_dir, tmp_path, argv, message):
    base = ["optimize", "--model", model_dir, "--output", str(tmp_path / "o"),
            "--report", str(tmp_path / "r.json"), "--no-speed"]
    code = cli.main(base + argv)
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("[optimize]")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("keras-llm: error:"), err
    assert message in lines[0]
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "r.json")


def test_cli_missing_model_and_output_equal_to_input(capsys, model_dir, tmp_path):
    code = cli.main(["optimize", "--model", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "o"), "--report", str(tmp_path / "r.json"), "--prune", "0.5"])
    assert code == 2 and "no such model file or directory" in capsys.readouterr().err
    code = cli.main(["optimize", "--model", model_dir, "--output", model_dir,
                     "--report", str(tmp_path / "r.json"), "--prune", "0.5"])
    assert code == 2 and "must not be the input model" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if "staging" in p]


def test_ctrl_c_leaves_no_output_and_no_report(model_dir, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "keras_llm.cli", "optimize", "--model", model_dir,
         "--output", str(out), "--report", str(report), "--prune", "0.5",
         "--recovery-steps", "1000000", "--no-speed", "--eval-tokens", "64",
         "--train-tokens", "1024"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    seen = []
    deadline = time.time() + 240
    for line in process.stderr:
        seen.append(line)
        if "recovery fine-tune" in line or time.time() > deadline:
            break
    time.sleep(3)  # inside model.fit by now
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def test_model_dir_with_null_metadata_fields(tmp_path):
    """An imported preset's keras_llm.json carries "sparsity": null (and
    other nulls); steps that read those fields must take them as absent."""
    directory = tmp_path / "imported"
    tokenizer = byte_level_tokenizer(["h e", "l l"])
    model = tiny_model(seed=4, vocabulary_size=tokenizer.vocabulary_size)
    saving.save_model_dir(directory, model, tokenizer,
                          {"source": "test", "sparsity": None, "quantization": None})
    report = run(str(directory), tmp_path / "half", tmp_path / "h.json", dtype="bfloat16",
                 **{**FAST, "speed": False})
    assert [row["variant"] for row in report["rows"]][0] == "original"
    assert len(report["rows"]) == 2
    assert os.path.isfile(tmp_path / "half" / "model.keras")
