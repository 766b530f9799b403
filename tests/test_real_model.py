"""The embedded SmolLM2 against the float32 reference (marked real_model)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.models import config_from_model

pytestmark = pytest.mark.real_model


def test_config_is_smollm2(smollm2):
    cfg = config_from_model(smollm2.model)
    assert (cfg.num_layers, cfg.hidden_dim, cfg.num_query_heads, cfg.num_key_value_heads,
            cfg.intermediate_dim, cfg.vocabulary_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    assert smollm2.metadata["source_tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_prompt_ids_match_reference(smollm2, reference):
    for item in reference["generation"]:
        assert smollm2.tokenizer.encode(item["prompt"]) == item["prompt_ids"]


def test_last_position_logits_match_reference_top10(smollm2, reference):
    for item in reference["generation"]:
        logits = smollm2.model(tf.constant([item["prompt_ids"]])).numpy()[0, -1]
        top = np.argsort(-logits)[:10].tolist()
        assert top == item["last_logits_top10_ids"]
        np.testing.assert_allclose(logits[top], item["last_logits_top10"], atol=1e-3)


def test_greedy_24_tokens_match_reference_alone_and_batched(smollm2, reference):
    # The default path: the engine over the model's LiteRT file (float32).
    assert smollm2.engine.backend.capabilities.name == "litert"
    prompts = [item["prompt_ids"] for item in reference["generation"]]
    batched = smollm2.generate_ids(prompts, max_new_tokens=24, stop_ids=())
    for item, result in zip(reference["generation"], batched):
        assert result.token_ids == item["greedy24"]
        alone = smollm2.generate_ids([item["prompt_ids"]], max_new_tokens=24, stop_ids=())[0]
        assert alone.token_ids == item["greedy24"]


def test_xla_backend_matches_reference(reference):
    import keras_llm

    lm = keras_llm.load("smollm2", backend="xla", progress=False)
    assert lm.engine.backend.capabilities.name == "xla"
    prompts = [item["prompt_ids"] for item in reference["generation"]]
    for item, result in zip(reference["generation"],
                            lm.generate_ids(prompts, max_new_tokens=24, stop_ids=())):
        assert result.token_ids == item["greedy24"]


def test_streamed_text_equals_reference_text(smollm2, reference):
    item = reference["generation"][0]
    deltas, final = [], None
    for piece in smollm2.stream(item["prompt"], max_new_tokens=24, stop_ids=()):
        if isinstance(piece, tuple):
            deltas.append(piece[0])
        else:
            final = piece
    assert final.token_ids == item["greedy24"]
    assert "".join(deltas) == item["text"] == final.text


def test_chat_answer_stops_at_im_end(smollm2):
    out = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=48)
    assert out.finish_reason == "stop"
    assert "Paris" in out.text


def test_cli_generate_json_subprocess(smollm2, reference):
    item = reference["generation"][0]
    proc = subprocess.run(
        [sys.executable, "-m", "keras_llm.cli", "generate", "--model", "smollm2", "--prompt",
         item["prompt"], "--max-new-tokens", "24", "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["prompt_token_ids"] == item["prompt_ids"]
    assert record["token_ids"] == item["greedy24"][:len(record["token_ids"])]
    assert record["decode_tokens_per_s"] > 0 and record["time_to_first_token_s"] > 0


@pytest.fixture(scope="module")
def smollm2_export(smollm2, tmp_path_factory):
    """One export for the tests below (each takes minutes): SavedModel plus
    the model's own LiteRT files (the export copies the files already built)."""
    from keras_llm.export.saved_model import export_model
    from keras_llm.runtime import artifacts

    o = artifacts.DEFAULT_LITERT
    base = tmp_path_factory.mktemp("smollm2-export")
    path = export_model(smollm2, base, "smollm2", max_new_tokens=24, progress=False,
                        litert_batch_sizes=o["batch_sizes"], litert_max_length=o["max_length"],
                        litert_lengths=o["lengths"])
    return base / "smollm2", path


def test_exported_smollm2_serves_reference_greedy_in_fresh_process(smollm2, smollm2_export,
                                                                   reference):
    from tests.test_export import run_in_fresh_process

    _, path = smollm2_export
    items = [reference["generation"][0], reference["generation"][2]]
    result = run_in_fresh_process(path, "serving_default", {"prompt": [i["prompt"] for i in items]})
    assert result["imported_modules"] == []
    expected = smollm2.generate([i["prompt"] for i in items], max_new_tokens=24)
    for row, (item, completion) in enumerate(zip(items, expected)):
        n = result["num_tokens"][row]
        assert result["token_ids"][row][:n] == completion.token_ids == item["greedy24"][:n]
        assert result["text"][row] == completion.text


def test_server_on_exported_smollm2(smollm2, smollm2_export, reference):
    """The real server on loopback with SmolLM2 on the export's LiteRT file:
    Predict with TF Serving's stubs (through the engine), streaming (non-ASCII
    intact), and concurrent streams and Predict calls equal to alone."""
    import concurrent.futures

    from keras_llm.serving.client import Client
    from keras_llm.serving.engine import EngineConfig
    from keras_llm.serving.server import Server

    base, _ = smollm2_export
    server = Server({"smollm2": str(base)}, port=0, poll_seconds=0,
                    engine_config=EngineConfig(max_slots=2, max_length=256))
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=600) as client:
            item = reference["generation"][0]
            out = client.predict("smollm2", [item["prompt"]])
            assert out["token_ids"][0][:out["num_tokens"][0]].tolist() == item["greedy24"]
            chinese = reference["generation"][1]
            deltas = list(client.stream(chinese["prompt_ids"], max_new_tokens=24))
            summary = client.last_summary
            assert list(summary.token_ids) == chinese["greedy24"]
            assert "".join(deltas) == summary.text == smollm2.tokenizer.decode(chinese["greedy24"])
            assert "你好" in summary.text
        prompts = [i["prompt_ids"] for i in reference["generation"]]

        def one(ids):
            with Client(f"127.0.0.1:{server.port}", timeout=600) as c:
                return list(c.generate(ids, max_new_tokens=24).token_ids)

        def predicted(ids):
            with Client(f"127.0.0.1:{server.port}", timeout=600) as c:
                out = c.predict_ids("smollm2", [ids], max_new_tokens=24)
                return out["token_ids"][0][:out["num_tokens"][0]].tolist()

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(one, prompts))
            by_predict = list(pool.map(predicted, prompts))
        expected = [i["greedy24"] for i in reference["generation"]]
        assert together == expected
        # generate_ids stops at the model's stop ids; the reference never stops.
        for got, want in zip(by_predict, expected):
            assert got == want[:len(got)] and len(got) > 0
    finally:
        server.drain(0)


def test_chat_prompt_ids_are_the_gguf_template_rendered_by_jinja(smollm2):
    """`--chat` ids equal the GGUF's own template rendered by plain Jinja (as
    transformers renders it), default system message included."""
    import gguf
    import jinja2.sandbox

    from keras_llm import presets

    reader = gguf.GGUFReader(presets.preset_checkpoint("smollm2"))
    field = reader.fields["tokenizer.chat_template"]
    source = bytes(field.parts[field.data[0]]).decode("utf-8")
    template = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True).from_string(source)
    one_turn = [{"role": "user", "content": "What is the capital of France?"}]
    several = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "Hello! How can I help?"},
               {"role": "user", "content": "Name a colour."}]
    for messages in (one_turn, several, several[1:]):
        text = template.render(messages=messages, add_generation_prompt=True)
        assert smollm2.encode(messages, chat=True) == smollm2.host_tokenizer.encode(text)
    default = template.render(messages=one_turn, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in default
    assert smollm2.encode("What is the capital of France?", chat=True) == \
        smollm2.host_tokenizer.encode(default)
    # The CLI's --system "" gives an empty system turn, not the default one.
    empty = template.render(messages=[{"role": "system", "content": ""}] + one_turn,
                            add_generation_prompt=True)
    assert smollm2.encode(one_turn[0]["content"], chat=True, system="") == \
        smollm2.host_tokenizer.encode(empty)


def test_speculative_decoding_with_the_int4_draft_keeps_the_greedy_answers(smollm2):
    """SmolLM2's own int4 weights draft, its float32 LiteRT files check:
    chat answers token for token the float32 model's, most guesses kept."""
    import keras_llm

    fast = keras_llm.load("smollm2", progress=False, draft="int4")
    prompts = ["Explain in two sentences why the sky is blue.",
               "Write a short poem about a cat sleeping in the sun."]
    for prompt in prompts:
        expected = smollm2.generate(prompt, chat=True, max_new_tokens=64)
        got = fast.generate(prompt, chat=True, max_new_tokens=64)
        assert got.token_ids == expected.token_ids, prompt
    stats = fast.engine.speculator.stats()
    assert stats["acceptance_rate"] > 0.6, stats  # 0.81 to 0.90 measured (README)
