"""The benchmark suite, run for real in quick mode on a tiny model."""

import glob
import json
import os

import numpy as np
import pytest

from benchmarks import suite
from benchmarks.llama_cpp import write_gguf
from keras_llm import gguf_import, saving
from tests.gguf_writer import write_llama_gguf
from tests.helpers import byte_level_tokenizer, tiny_language_model, tiny_model

ENGINES = ("keras-llm-xla", "keras-llm-server", "keras-llm-server-litert-int8", "document-way",
           "keras-llm-litert-int8", "keras-llm-litert-f32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lm = tiny_language_model(seed=3)
    return saving.save_model_dir(tmp_path_factory.mktemp("bench") / "tiny", lm.model,
                                 lm.tokenizer, {"source": "tiny"})


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("bench_out")
    code = suite.main(["--model", model_dir, "--quick", "--output", str(output),
                       "--engines", ",".join(ENGINES + ("llama.cpp-f32",)), "--profile"])
    assert code == 0
    with open(output / "results.json", encoding="utf-8") as handle:
        return json.load(handle), output


def _check_summary(summary):
    assert summary["n"] >= 1
    assert 0 < summary["min"] <= summary["median"] <= summary["max"]


def test_every_engine_measured_every_figure(report):
    data, _ = report
    results = {r["engine"]: r for r in data["results"]}
    for name in ENGINES:
        assert results[name]["status"] == "ok", results[name]
    common = {"prefill_tokens_per_s", "time_to_first_token_s_p32", "time_to_first_token_s",
              "decode_tokens_per_s_b1", "peak_rss_bytes"}
    expected = {
        "keras-llm-xla": common | {"aggregate_tokens_per_s_2", "generate_tokens_per_s_16"},
        "keras-llm-server": common | {"aggregate_tokens_per_s_1", "aggregate_tokens_per_s_2"},
        "keras-llm-server-litert-int8": common | {"aggregate_tokens_per_s_1",
                                                  "aggregate_tokens_per_s_2"},
        "document-way": common | {"generate_tokens_per_s_16"},
        "keras-llm-litert-int8": common | {"aggregate_tokens_per_s_2",
                                           "generate_tokens_per_s_16"},
        "keras-llm-litert-f32": common | {"aggregate_tokens_per_s_2",
                                          "generate_tokens_per_s_16"},
    }
    for name in ENGINES:
        metrics = expected[name]
        assert set(results[name]["metrics"]) == metrics
        for metric, summary in results[name]["metrics"].items():
            _check_summary(summary)
            if metric != "peak_rss_bytes":
                assert summary["n"] == (1 if metric.startswith("generate") else 2), metric
        assert len(results[name]["token_ids"]) == 8
    assert results["keras-llm-server"]["metrics"]["peak_rss_bytes"]["median"] > 50 << 20


def test_same_greedy_tokens_everywhere(report):
    data, _ = report
    for name in ENGINES:
        if name != "keras-llm-litert-int8":  # int8 may part from float32
            assert data["token_agreement"][name] == {"same_leading_tokens": 8, "of": 8}


def test_ratios_are_ratios_of_medians(report):
    data, _ = report
    results = {r["engine"]: r["metrics"] for r in data["results"] if r["status"] == "ok"}
    assert set(data["ratios"]) == {f"{name} vs document-way" for name in ENGINES
                                   if name != "document-way"}
    for pair, values in data["ratios"].items():
        ours, theirs = (results[name] for name in pair.split(" vs "))
        assert set(values) == set(ours) & set(theirs)
        for metric, ratio in values.items():
            a, b = ours[metric]["median"], theirs[metric]["median"]
            expected = b / a if metric.startswith(("time_to", "peak_rss")) else a / b
            assert ratio == pytest.approx(expected)
    xla = data["ratios"]["keras-llm-xla vs document-way"]
    assert xla["decode_tokens_per_s_b1"] > 1  # a KV cache beats recomputing the sequence


def test_targets_and_table(report):
    data, _ = report
    status = {t["target"]: t["status"] for t in data["targets"]}
    assert status["end to end at 16 new tokens vs the document's way"] in ("met", "missed")
    assert status["float32 decode at batch 1 vs llama.cpp F32"] in (
        "not measured", "met", "missed")
    ttft = [t for t in data["targets"] if t["target"].startswith("server time to first")]
    servers = {r["engine"]: r["metrics"]["time_to_first_token_s_p32"]["median"]
               for r in data["results"] if r["engine"].startswith("keras-llm-server")}
    assert set(servers) == {"keras-llm-server", "keras-llm-server-litert-int8"}
    # The best (lowest) of the server engines, named.
    assert (ttft[0]["seconds"], ttft[0]["engine"]) == min((v, k) for k, v in servers.items())
    for name in ENGINES:
        assert name in data["table"]
    llama = next(r for r in data["results"] if r["engine"] == "llama.cpp-f32")
    assert llama["status"] == "skipped"  # no GGUF source, or llama-cpp-python not installed


def test_tensorboard_scalars_and_profile(report):
    data, output = report
    events = glob.glob(str(output / "tensorboard" / "events.out.tfevents.*"))
    assert events
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    tags = {}
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            tags[value.tag] = float(tf.make_ndarray(value.tensor))
    median = data["results"][0]["metrics"]["decode_tokens_per_s_b1"]["median"]
    assert tags["keras-llm-xla/decode_tokens_per_s_b1/median"] == pytest.approx(median)
    assert any(t.startswith("ratio/") for t in tags)
    assert glob.glob(str(output / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_bad_engine_name_is_one_line_error(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown engine"):
        suite.main(["--model", model_dir, "--engines", "nope", "--output", str(tmp_path)])


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_gguf_rewrite_keeps_the_weights(tmp_path, tensor_type):
    tokenizer = byte_level_tokenizer(["h e"])
    # Rows of 32 and 64 values: whole Q8_0 blocks.
    model = tiny_model(seed=4, vocabulary_size=tokenizer.vocabulary_size, hidden_dim=32,
                       head_dim=8, intermediate_dim=64)
    source = tmp_path / "source.gguf"
    write_llama_gguf(source, model, tokenizer, tensor_type="F32")
    target = tmp_path / f"rewrite.{tensor_type}.gguf"
    write_gguf(str(source), str(target), tensor_type)
    original, _, _ = gguf_import.load_gguf(str(source), progress=False)
    rewritten, loaded_tokenizer, _ = gguf_import.load_gguf(str(target), progress=False)
    assert loaded_tokenizer.vocabulary == tokenizer.vocabulary
    for a, b in zip(original.get_weights(), rewritten.get_weights()):
        if tensor_type == "F32" or a.ndim == 1:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=np.abs(a).max() / 127 + 1e-7)
    assert not os.path.exists(f"{target}.partial")


def test_optimized_speed_compares_models_in_one_process(model_dir, tmp_path):
    from benchmarks import optimized_speed  # pylint: disable=import-outside-toplevel
    from keras_llm import litert  # pylint: disable=import-outside-toplevel

    lm = saving.load_model_dir(model_dir)[0]
    tflite = litert.convert(lm, str(tmp_path / "model.tflite"), batch_sizes=(1, 2),
                            max_length=64, prefill_length=16)
    output = tmp_path / "speed.json"
    code = optimized_speed.main([model_dir, tflite, "--prompt-tokens", "4", "--new-tokens", "6",
                                 "--batch-sizes", "1,2", "--repeats", "2",
                                 "--output", str(output)])
    assert code == 0
    with open(output, encoding="utf-8") as handle:
        rows = json.load(handle)["rows"]
    assert [row["model"] for row in rows] == [model_dir, tflite]
    assert rows[0]["b1_ratio"] == 1.0 and rows[0]["b2_ratio"] == 1.0
    for row in rows:
        for b in (1, 2):
            _check_summary(row[f"b{b}"])
            assert row[f"b{b}"]["n"] == 2
