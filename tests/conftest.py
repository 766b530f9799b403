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


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 as a LanguageModel (imported once, then cached)."""
    return keras_llm.load("smollm2", progress=False)


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
