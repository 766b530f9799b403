"""Shared fixtures. Importing keras_llm first selects tf_keras (Keras 2)."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

import keras_llm  # noqa: E402,F401  pylint: disable=unused-import


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: needs the embedded SmolLM2 checkpoint; runs in CI")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2 as a LanguageModel (imported once, then cached on
    disk). Module-scoped and stopped after, so its weights (several GB) do not
    stay resident for the rest of the suite."""
    lm = keras_llm.load("smollm2", progress=False)
    yield lm
    if lm._engine is not None:  # pylint: disable=protected-access
        lm.engine.stop(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module(request):
    """Give back what a test module freed (Keras graphs, engines, servers),
    so the suite's resident memory does not pile up on a small CI machine."""
    yield
    import ctypes
    import gc

    import tf_keras

    tf_keras.backend.clear_session()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    log = os.environ.get("KERAS_LLM_TEST_RSS_LOG")  # where the suite's memory goes, per module
    if log:
        with open("/proc/self/status", encoding="ascii") as status:
            rss = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"{request.module.__name__} {int(rss) // 1024} MiB\n")


@pytest.fixture(scope="session")
def reference():
    from tests.helpers import load_reference

    data = load_reference()
    if data is None:
        message = "tests/data/smollm2_reference.json is missing (copy it from shared/reference/)"
        if os.environ.get("CI"):
            pytest.fail(message + "")
        pytest.skip(message)
    return data
