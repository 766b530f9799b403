"""The keras-llm command line, in-process and as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest

from keras_llm import cli, saving
from tests.helpers import byte_level_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny"
    tokenizer = byte_level_tokenizer(["h e", "l l", "he ll"])
    model = tiny_model(seed=2, vocabulary_size=tokenizer.vocabulary_size)
    saving.save_model_dir(directory, model, tokenizer, {"source": "test", "architecture": "llama"})
    return str(directory)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "hello",
                         "--max-new-tokens", "6", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert set(record) >= {"text", "token_ids", "prompt_token_ids", "time_to_first_token_s",
                           "decode_tokens_per_s"}
    assert len(record["token_ids"]) <= 6
    assert record["prompt_token_ids"] == saving.load_model_dir(model_dir)[1].encode("hello")
    assert record["text"] == saving.load_model_dir(model_dir)[1].decode(record["token_ids"])


def test_generate_plain_streams_the_same_text(capsys, model_dir):
    code, out, _ = run(capsys, "generate", "--model", model_dir, "--prompt", "hello",
                       "--max-new-tokens", "6", "--json")
    expected = json.loads(out)["text"]
    code, out, _ = run(capsys, "generate", "--model", model_dir, "--prompt", "hello",
                       "--max-new-tokens", "6")
    assert code == 0 and out == expected + "\n"


def test_tokenize(capsys, model_dir):
    code, out, _ = run(capsys, "tokenize", "--model", model_dir, "--text", "hello", "--json")
    assert code == 0
    ids = json.loads(out)["ids"]
    code, out, _ = run(capsys, "tokenize", "--model", model_dir, "--text", "hello")
    assert out.split() == [str(i) for i in ids]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model"),
    (["generate", "--prompt", "", "--model", "MODEL"], "empty prompt"),
    (["generate", "--prompt", "x" * 300, "--model", "MODEL"], "per-sequence limit"),
    (["generate", "--prompt", "hi", "--top-p", "1.5", "--model", "MODEL"], "top_p"),
    (["generate", "--prompt", "hi", "--model", "CORRUPT"], "cannot load"),
    (["tokenize", "--text", "hi", "--model", "/nonexistent/x.gguf"], "no such model file"),
])
def test_bad_input_one_line_error(capsys, model_dir, tmp_path, argv, message):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"\x00garbage")
    argv = [{"MODEL": model_dir, "CORRUPT": str(corrupt)}.get(a, a) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("keras-llm: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_negative_max_tokens_is_a_usage_error(capsys, model_dir):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "-3"])
    assert exit_info.value.code == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_console_script_subprocess_no_traceback(model_dir, tmp_path):
    env = dict(os.environ, KERAS_LLM_HOME=str(tmp_path))
    ok = subprocess.run([sys.executable, "-m", "keras_llm.cli", "tokenize", "--model", model_dir,
                         "--text", "hello", "--json"], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0 and "ids" in json.loads(ok.stdout)
    bad = subprocess.run([sys.executable, "-m", "keras_llm.cli", "generate", "--model",
                          str(tmp_path / "missing.h5"), "--prompt", "hi"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "keras-llm: error:" in bad.stderr


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_model_file_with_tokenizer_beside_it(capsys, model_dir, tmp_path, suffix):
    import shutil

    model, tokenizer, _ = saving.load_model_dir(model_dir)
    path = tmp_path / f"model{suffix}"
    model.save(str(path))
    shutil.copy(os.path.join(model_dir, saving.TOKENIZER_FILE), tmp_path)
    code, out, err = run(capsys, "generate", "--model", str(path), "--prompt", "hello",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    code, expected, _ = run(capsys, "generate", "--model", model_dir, "--prompt", "hello",
                            "--max-new-tokens", "4", "--json")
    assert json.loads(out)["token_ids"] == json.loads(expected)["token_ids"]
    os.remove(tmp_path / saving.TOKENIZER_FILE)
    code, _, err = run(capsys, "generate", "--model", str(path), "--prompt", "hello")
    assert code == 2 and "no tokenizer" in err


def test_export_litert_lengths_flag(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "export", "--model", model_dir, "--model_base_path", str(tmp_path),
                       "--model_name", "tiny", "--no-warmup", "--litert", "float32",
                       "--litert-batch-sizes", "1,2", "--litert-max-length", "32",
                       "--litert-lengths", "16")
    assert code == 0, err
    with open(tmp_path / "tiny" / "1" / "assets" / "keras_llm.json", encoding="utf-8") as handle:
        meta = json.load(handle)["litert"]
    assert (meta["batch_sizes"], meta["max_length"], meta["lengths"]) == ([1, 2], 32, [16])
    code, _, err = run(capsys, "export", "--model", model_dir, "--model_base_path", str(tmp_path),
                       "--model_name", "bad", "--litert", "float32", "--litert-lengths", "x")
    assert code == 2 and "--litert-lengths takes" in err
