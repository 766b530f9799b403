"""Saving and loading keras-llm models and model directories.

A model directory holds:
    model.keras      the Functional model (tf_keras native format)
    tokenizer.json   vocabulary, merges, special tokens, chat template
    keras_llm.json   metadata: source, architecture, dtype, quantization, ...

`load_model` is `tf.keras.models.load_model` with safe loading for both
formats: tf_keras refuses a `.keras` file carrying Python code (a `Lambda`
layer) by default, but its legacy `.h5` path would run it; here both are
refused unless the caller passes `safe_mode=False`.
"""

import json
import os
import shutil
import tempfile
import zipfile

import tensorflow as tf
import tf_keras as keras
from tf_keras.src.saving import serialization_lib

MODEL_FILE = "model.keras"
METADATA_FILE = "keras_llm.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file or directory cannot be loaded."""


class UnsafeModelError(ModelFileError):
    """The file carries Python code and safe mode is on."""


def _h5_layer_classes(path):
    import h5py  # pylint: disable=import-outside-toplevel

    with h5py.File(path, "r") as handle:
        raw = handle.attrs.get("model_config")
    if raw is None:
        return []
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    classes = []

    def walk(node):
        if isinstance(node, dict):
            if "class_name" in node:
                classes.append(node["class_name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(raw))
    return classes


def load_model(path, custom_objects=None, safe_mode=True,
               compile=False):  # pylint: disable=redefined-builtin
    """Load a `.keras` or `.h5` model file.

    Args:
        path: the file.
        custom_objects: `{name: class}` of the user's own layers (not needed
            for classes registered with `register_keras_serializable`).
        safe_mode: refuse files that would run code carried inside them
            (`Lambda` layers). Pass False only for files you trust.
        compile: restore the training configuration too.

    Returns:
        The `keras.Model`.

    Raises:
        UnsafeModelError: the file carries code and `safe_mode` is on.
        ModelFileError: the file is missing, not a model, or corrupt.
    """
    import keras_llm.layers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"no such model file: {path}")
    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise ModelFileError(f"{path}: expected a .keras or .h5 model file")
    if path.endswith((".h5", ".hdf5")) and safe_mode:
        try:
            classes = _h5_layer_classes(path)
        except OSError as error:
            raise ModelFileError(f"{path} is not a readable HDF5 model: {error}") from None
        if "Lambda" in classes:
            raise UnsafeModelError(
                f"{path} contains a Lambda layer, whose Python code would run on "
                "load; refusing in safe mode. Load it with safe_mode=False "
                "(--unsafe on the command line) only if you trust the file.")
    try:
        with serialization_lib.SafeModeScope(safe_mode), \
                keras.saving.custom_object_scope(dict(custom_objects or {})):
            if path.endswith(".keras") and not compile:
                return _load_keras_archive(path, safe_mode)
            return keras.models.load_model(path, compile=compile, safe_mode=safe_mode)
    except ValueError as error:
        if "Lambda" in str(error) and safe_mode:
            raise UnsafeModelError(
                f"{path} contains a Lambda layer, whose Python code would run on "
                "load; refusing in safe mode. Load it with safe_mode=False "
                "(--unsafe on the command line) only if you trust the file.") from None
        raise ModelFileError(f"cannot load {path}: {_first_line(error)}") from None
    except (OSError, KeyError, TypeError, tf.errors.OpError) as error:
        raise ModelFileError(f"cannot load {path}: {_first_line(error)}") from None
    except Exception as error:  # zip/h5 libraries raise assorted types on corrupt files
        raise ModelFileError(
            f"cannot load {path} ({type(error).__name__}): {_first_line(error)}") from None


def _load_keras_archive(path, safe_mode):
    """Load a `.keras` archive by extracting its weights file first.

    tf_keras reads the HDF5 weights straight out of the zip through
    `tf.io.gfile`, and h5py's random reads make every seek re-read the member:
    a 540 MB model takes minutes. Extracted to a temporary file, the same
    weights load in about a second, into the same model the config describes.
    """
    with zipfile.ZipFile(path, "r") as archive:
        names = set(archive.namelist())
        if "config.json" not in names or "model.weights.h5" not in names:
            raise ModelFileError(f"{path} is not a Keras model archive "
                                 f"(has {sorted(names)[:4]})")
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None
        model = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
        with tempfile.TemporaryDirectory(prefix="keras_llm_") as tmp:
            weights = os.path.join(tmp, "model.weights.h5")
            with archive.open("model.weights.h5") as source, open(weights, "wb") as target:
                shutil.copyfileobj(source, target, 16 << 20)
            _widen_bfloat16(weights)
            model.load_weights(weights)
    return model


def _widen_bfloat16(weights_path):
    """Rewrite bfloat16 arrays of an extracted weights file as float32 (exact).

    h5py has no bfloat16: tf_keras writes such variables as 2-byte opaque
    data it cannot read back. Widened here, they load into the model's
    bfloat16 variables unchanged.
    """
    import h5py  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    with h5py.File(weights_path, "r+") as handle:
        opaque = []
        handle.visititems(lambda name, item: opaque.append(name) if isinstance(
            item, h5py.Dataset) and item.dtype.kind == "V" and item.dtype.itemsize == 2 else None)
        for name in opaque:
            bits = np.frombuffer(handle[name][()].tobytes(), np.uint16)
            widened = (bits.astype(np.uint32) << 16).view(np.float32)
            shape = handle[name].shape
            del handle[name]
            handle.create_dataset(name, data=widened.reshape(shape))


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def save_model_dir(directory, model, tokenizer, metadata):
    """Write a model directory atomically (nothing half-written on failure).

    Args:
        directory: where the directory goes; an existing one is replaced.
        model: the keras model.
        tokenizer: a `BytePairTokenizer`.
        metadata: JSON-serializable dict (source, architecture, dtype, ...).
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    try:
        model.save(os.path.join(staging, MODEL_FILE))
        tokenizer.save_assets(staging)
        record = {"format": "keras-llm-model", "format_version": FORMAT_VERSION, **metadata}
        with open(os.path.join(staging, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def is_model_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def load_model_dir(directory, safe_mode=True):
    """Load `(model, tokenizer, metadata)` from a model directory."""
    from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel

    try:
        with open(os.path.join(directory, METADATA_FILE), encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{directory}: unreadable {METADATA_FILE}: {error}") from None
    if metadata.get("format") != "keras-llm-model":
        raise ModelFileError(f"{directory}: {METADATA_FILE} is not keras-llm metadata")
    model = load_model(os.path.join(directory, MODEL_FILE), safe_mode=safe_mode)
    try:
        tokenizer = BytePairTokenizer.load_assets(directory)
    except (OSError, ValueError, KeyError) as error:
        raise ModelFileError(f"{directory}: cannot load the tokenizer: {error}") from None
    return model, tokenizer, metadata
