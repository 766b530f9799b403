"""Saving and loading keras-llm models and model directories.

A model directory holds:
    model.keras      the Functional model (tf_keras native format; a pruned
                     model's weights may be packed sparse, see below)
    tokenizer.json   vocabulary, merges, special tokens, chat template
    keras_llm.json   metadata: source, architecture, dtype, quantization, ...

`load_model` is `tf.keras.models.load_model` with safe loading for both
formats: tf_keras refuses a `.keras` file carrying Python code (a `Lambda`
layer) by default, but its legacy `.h5` path would run it; here both are
refused unless the caller passes `safe_mode=False`.

Sparse weights: `save_model_dir(..., sparse=True)` (what `keras-llm
optimize` writes for a pruned model) replaces the archive's
`model.weights.h5` by `model.weights.sparse.safetensors`, the same arrays
packed: an array that is at least a quarter zeros is stored as a bit mask
plus its nonzero values, and a float32 array whose values are all exact in
bfloat16 as bfloat16 bits; the member is deflated (level 1). All of it is
lossless, and the file's size follows the nonzeros; the arrays
are unpacked into an HDF5 weights file at load, which then goes on as for
any `.keras` archive. Plain `tf_keras.models.load_model` does not read the
packed form: `densify(path, out)` writes the plain archive.
"""

import json
import os
import shutil
import tempfile
import zipfile

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras.src.saving import serialization_lib

MODEL_FILE = "model.keras"
WEIGHTS_H5 = "model.weights.h5"
WEIGHTS_SPARSE = "model.weights.sparse.safetensors"
_SPARSE_FORMAT = "keras-llm-sparse-weights"
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
        if "config.json" not in names or not names & {WEIGHTS_H5, WEIGHTS_SPARSE}:
            raise ModelFileError(f"{path} is not a Keras model archive "
                                 f"(has {sorted(names)[:4]})")
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None
        model = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
        with tempfile.TemporaryDirectory(prefix="keras_llm_") as tmp:
            weights = extract_weights(archive, os.path.join(tmp, WEIGHTS_H5))
            _widen_bfloat16(weights)
            model.load_weights(weights)
    return model


def extract_weights(archive, target):
    """Write a `.keras` archive's weights to the HDF5 file `target` (unpacked
    when they are stored sparse); returns `target`."""
    if WEIGHTS_H5 in archive.namelist():
        with archive.open(WEIGHTS_H5) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 16 << 20)
    else:
        _unpack_weights(archive.read(WEIGHTS_SPARSE), target)
    return target


def _exact_in_bfloat16(array):
    return array.dtype == "float32" and not np.any(array.view(np.uint32) & 0xFFFF)


def _pack_weights(h5_path):
    """The arrays of a tf_keras weights file as sparse safetensors bytes."""
    import h5py  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

    groups, layout, tensors = [], {}, {}
    with h5py.File(h5_path, "r") as handle:
        def visit(name, item):
            if isinstance(item, h5py.Group):
                groups.append(name)
                return
            array = item[()]
            entry = {"shape": list(array.shape), "dtype": array.dtype.str}
            if array.dtype.kind == "V":  # tf_keras's opaque bfloat16: keep the bits
                array = np.frombuffer(array.tobytes(), np.uint16).reshape(array.shape)
            flat = np.ascontiguousarray(array).reshape(-1)
            nonzero = flat != 0
            if flat.size >= 64 and array.dtype.kind in "fiu" and \
                    np.count_nonzero(nonzero) <= 0.75 * flat.size:
                tensors[name + "@mask"] = np.packbits(nonzero)
                flat = flat[nonzero]
                entry["sparse"] = True
            if _exact_in_bfloat16(flat):
                flat = (flat.view(np.uint32) >> 16).astype(np.uint16)
                entry["bfloat16_bits"] = True
            tensors[name] = flat
            layout[name] = entry
        handle.visititems(visit)
    return save(tensors, metadata={"format": _SPARSE_FORMAT, "version": "1",
                                   "groups": json.dumps(groups), "arrays": json.dumps(layout)})


def _unpack_weights(data, h5_path):
    """Write the HDF5 weights file that `_pack_weights` packed."""
    import h5py  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel

    # safetensors: an 8-byte little-endian header length, then the JSON
    # header, whose "__metadata__" holds the layout.
    try:
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        metadata = {}
    if metadata.get("format") != _SPARSE_FORMAT:
        raise ModelFileError(f"{WEIGHTS_SPARSE} is not keras-llm sparse weights")
    tensors = load(data)
    with h5py.File(h5_path, "w") as handle:
        for group in json.loads(metadata["groups"]):
            handle.require_group(group)
        for name, entry in json.loads(metadata["arrays"]).items():
            dtype = np.dtype(entry["dtype"])
            flat = tensors[name]
            if entry.get("bfloat16_bits"):
                flat = (flat.astype(np.uint32) << 16).view(np.float32)
            size = int(np.prod(entry["shape"], dtype=np.int64))
            if entry.get("sparse"):
                nonzero = np.unpackbits(tensors[name + "@mask"], count=size).astype(bool)
                full = np.zeros(size, flat.dtype)
                full[nonzero] = flat
                flat = full
            if dtype.kind == "V":
                flat = flat.astype(np.uint16).view(dtype)
            handle.create_dataset(name, data=flat.astype(dtype, copy=False)
                                  .reshape(entry["shape"]))


def save_sparse(model, path):
    """Save `model` as a `.keras` archive with its weights packed sparse."""
    with tempfile.TemporaryDirectory(prefix="keras_llm_") as tmp:
        dense = os.path.join(tmp, MODEL_FILE)
        model.save(dense)
        _repack(dense, path, pack=True)
    return path


def densify(path, target):
    """Write the plain tf_keras archive of a (possibly sparse) `.keras` file."""
    _repack(path, target, pack=False)
    return target


def _repack(source, target, pack):
    with zipfile.ZipFile(source, "r") as archive, tempfile.TemporaryDirectory(
            prefix="keras_llm_") as tmp:
        weights = extract_weights(archive, os.path.join(tmp, WEIGHTS_H5))
        with zipfile.ZipFile(target, "w") as out:
            for member in archive.namelist():
                if member not in (WEIGHTS_H5, WEIGHTS_SPARSE):
                    out.writestr(archive.getinfo(member), archive.read(member))
            if pack:
                # Deflate at level 1 on top: cheap, and weights dequantized from
                # a 4-bit checkpoint (SmolLM2's embedding) repeat a lot.
                out.writestr(WEIGHTS_SPARSE, _pack_weights(weights),
                             compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
            else:
                out.write(weights, WEIGHTS_H5)


def _widen_bfloat16(weights_path):
    """Rewrite bfloat16 arrays of an extracted weights file as float32 (exact).

    h5py has no bfloat16: tf_keras writes such variables as 2-byte opaque
    data it cannot read back. Widened here, they load into the model's
    bfloat16 variables unchanged.
    """
    import h5py  # pylint: disable=import-outside-toplevel

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


def save_model_dir(directory, model, tokenizer, metadata, sparse=False, saved_file=None):
    """Write a model directory atomically (nothing half-written on failure).

    Args:
        directory: where the directory goes; an existing one is replaced.
        model: the keras model.
        tokenizer: a `BytePairTokenizer`.
        metadata: JSON-serializable dict (source, architecture, dtype, ...).
        sparse: pack the weights (`save_sparse`): for pruned models.
        saved_file: `model` already saved as a `.keras` file (moved in, not
            saved again).
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    try:
        target = os.path.join(staging, MODEL_FILE)
        if saved_file is not None:
            shutil.move(saved_file, target)
        elif sparse:
            save_sparse(model, target)
        else:
            model.save(target)
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
