"""Where compiled artifacts live, and when they must be rebuilt.

This module owns the file layout that the rest of keras-llm reads:

- A model directory (`keras_llm.saving`) keeps its converted LiteRT file
  beside the weights: `litert/<precision>.tflite` with a manifest
  `litert/<precision>.json` recording what it was built from (the weights
  file's size and modification time, the keras-llm and TensorFlow versions,
  the conversion options), and XNNPACK's packed weights beside it
  (`<file>.<key>.xnnpack`, `keras_llm.runtime.litert`). A changed
  model, converter or option set gives a
  different key and the file is rebuilt; files are written to a staging
  name and renamed into place, so a crash never leaves half a file.
- A model that is not a directory (a `.gguf`, `.keras` or `.h5` file) keeps
  its artifacts under `$KERAS_LLM_HOME/artifacts/<hash of its path>/`.
- An export (`keras_llm.export`) carries its LiteRT files beside
  `EXPORT_LITERT` inside the version directory, listed in its metadata.

Nothing here imports TensorFlow; `build_litert` imports the converter only
when a file has to be built.
"""

import contextlib
import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time

from keras_llm.progress import Progress

MODEL_FILE = "model.keras"
METADATA_FILE = "keras_llm.json"
EXPORT_LITERT = os.path.join("assets.extra", "litert", "model.tflite")
EXPORT_METADATA = os.path.join("assets", "keras_llm.json")

# The quantized LiteRT precisions: smoothed on calibration text when converted,
# and what `keras-llm optimize --quantize` writes beside a model.
QUANTIZED_LITERT = ("int8", "int4")
# One file holding every signature over one set of weights (XNNPACK's weights
# cache packs them once for all; `keras_llm.runtime.litert`).
# 5: a prefill over a short cache for prompts that fit in one call.
LITERT_LAYOUT = 5
# What a LiteRT file holds by default, for a model directory and for an
# export alike (so an export copies the file its model already has): decode
# steps for 1, 4 and 16 sequences over a 256- and a 1,024-position cache,
# a 64-token prefill (and one over a 64-position cache, for prompts of one
# call) and an 8-token verify step (speculative decoding).
# Signatures are prepared on first use, so one answer from the CLI pays for
# the two it runs, not for all ten.
DEFAULT_LITERT = {"max_length": 1024, "batch_sizes": [1, 4, 16], "lengths": [256],
                  "prefill_length": 64, "verify_length": 8}


def home():
    return os.environ.get("KERAS_LLM_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_llm")


def is_model_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def read_metadata(directory):
    with open(os.path.join(directory, METADATA_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def artifact_dir(source):
    """The directory holding `source`'s compiled artifacts."""
    source = os.path.abspath(os.fspath(source))
    if is_model_dir(source):
        return os.path.join(source, "litert")
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    return os.path.join(home(), "artifacts", digest, "litert")


def xla_cache_dir():
    """Where XLA's persistent compilation cache lives (keyed by XLA itself)."""
    return os.path.join(home(), "xla")


def use_persistent_xla_cache(directory=None):
    """Keep XLA's compiled programs in `directory` (default `xla_cache_dir()`)
    across processes (TF's `--tf_xla_persistent_cache_directory`). Takes
    effect when called before the process's first XLA compilation; an
    explicit TF_XLA_FLAGS setting of the directory wins."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in flags:
        directory = directory or xla_cache_dir()
        os.makedirs(directory, exist_ok=True)
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={directory}".strip()


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _weights_file(source):
    source = os.path.abspath(os.fspath(source))
    return os.path.join(source, MODEL_FILE) if is_model_dir(source) else source


def litert_key(source, precision, options):
    """What a LiteRT file built from `source` depends on."""
    from keras_llm import __version__  # pylint: disable=import-outside-toplevel
    weights = os.stat(_weights_file(source))
    return {"layout": LITERT_LAYOUT,
            "weights_size": weights.st_size, "weights_mtime_ns": weights.st_mtime_ns,
            "keras_llm": __version__, "tensorflow": _version("tensorflow"),
            "precision": precision, "options": dict(sorted(options.items()))}


def litert_paths(source, precision):
    directory = artifact_dir(source)
    return (os.path.join(directory, f"{precision}.tflite"),
            os.path.join(directory, f"{precision}.json"))


def cached_litert(source, precision, options=None):
    """The LiteRT files (a list, the prefill's first) for `source` that are
    up to date, or None."""
    options = DEFAULT_LITERT if options is None else options
    path, manifest = litert_paths(source, precision)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return None
    if recorded.get("key") != litert_key(source, precision, options):
        return None
    files = [os.path.join(os.path.dirname(path), name) for name in recorded.get("files", [])]
    return files if files and all(os.path.isfile(f) for f in files) else None


@contextlib.contextmanager
def conversion_progress(precision, purpose, enabled=True):
    """Say that a LiteRT conversion starts (`purpose`: what it is for) and
    draw its progress bar on a terminal; yields the `progress` callback for
    `litert.convert`."""
    if enabled:
        print(f"keras-llm: converting the model to LiteRT ({precision}) {purpose} "
              "(about 1.5 minutes for 135M parameters on 2 cores)...", file=sys.stderr, flush=True)
    bar = Progress(1000, f"keras-llm: LiteRT {precision}",
                   enabled=bool(enabled) and sys.stderr.isatty())
    yield lambda fraction: bar.update(round(1000 * fraction))
    bar.close()


def build_litert(source, model, tokenizer, precision, options=None, progress=True):
    """Convert `model` (loaded from `source`) and store it as `source`'s
    LiteRT file (every signature in one file over one set of weights);
    returns `[path]`. The file is written atomically and the manifest, which
    makes it valid, last."""
    from keras_llm import litert  # pylint: disable=import-outside-toplevel  (TensorFlow)
    options = dict(DEFAULT_LITERT if options is None else options)
    path, manifest = litert_paths(source, precision)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    key = litert_key(source, precision, options)
    start = time.perf_counter()
    context = model_context(model)
    if os.path.exists(manifest):  # stale: the manifest goes first, then the files
        os.remove(manifest)
    stem = glob.escape(path[:-len(".tflite")])
    for old in glob.glob(stem + ".*.tflite") + glob.glob(stem + ".tflite.*.xnnpack"):
        os.remove(old)  # an earlier layout's signature files, or packed weights
    purpose = f"for fast decoding; once per model, kept in {os.path.dirname(path)}"
    with conversion_progress(precision, purpose, progress) as report:
        paths = [litert.convert(
            model, path, quantization=None if precision == "float32" else precision,
            max_length=min(options["max_length"], context),
            batch_sizes=options["batch_sizes"],
            lengths=[n for n in options["lengths"] if n < min(options["max_length"], context)],
            prefill_length=min(options["prefill_length"], context),
            verify_length=min(options.get("verify_length", 0), context),
            calibration_ids=(litert.calibration_ids(tokenizer)
                             if tokenizer is not None and precision in QUANTIZED_LITERT else None),
            progress=report)]
    _write_manifest(manifest, key, paths, start)
    if progress:
        print(f"keras-llm: LiteRT files ready in {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    return paths


def _write_manifest(manifest, key, paths, start):
    """Write the manifest that makes `paths` valid (atomically, last)."""
    handle, staging = tempfile.mkstemp(suffix=".json.partial", dir=os.path.dirname(manifest))
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump({"key": key, "files": [os.path.basename(p) for p in paths],
                   "build_s": round(time.perf_counter() - start, 1)}, out, indent=2)
    os.replace(staging, manifest)


RECOMPUTE = "recompute"  # a user's model's forward pass (no cache)
MHA_CACHE = "mha_cache"  # a user's MultiHeadAttention model, with a KV cache


def user_litert(source, name, options, convert, progress=True):
    """A LiteRT file of a user's model (`name`: `RECOMPUTE` or `MHA_CACHE`):
    converted once by `convert(path)` and kept with `source`'s artifacts
    (`<name>.tflite`, with a manifest keyed like `build_litert`'s on the
    weights file and `options`), or, for a model with no `source`, in a new
    temporary directory (the caller's to remove). Returns `(path, kept)`:
    `kept` when the file was there already."""
    if source is None:
        directory = tempfile.mkdtemp(prefix=f"keras_llm_{name}_")
        path, manifest, key = os.path.join(directory, f"{name}.tflite"), None, None
    else:
        path, manifest = litert_paths(source, name)
        key = litert_key(source, name, options)
        cached = cached_litert(source, name, options)
        if cached:
            return cached[0], True
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(manifest):
            os.remove(manifest)
    start = time.perf_counter()
    if progress:
        print("keras-llm: converting the model to LiteRT for fast decoding"
              + (f" (once; kept in {os.path.dirname(path)})" if source is not None else "")
              + "...", file=sys.stderr, flush=True)
    try:
        convert(path)
    except BaseException:
        if source is None:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        raise
    if manifest is not None:
        _write_manifest(manifest, key, [path], start)
    if progress:
        print(f"keras-llm: LiteRT file ready in {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    return path, False


def model_context(model):
    from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel
    return config_from_model(model).context_length


OPTIMIZED_LITERT = "model.tflite"  # what `keras-llm optimize --quantize` writes beside the model


def optimized_litert(source, metadata):
    """The int8 or int4 LiteRT file `keras-llm optimize --quantize` wrote into
    a model directory (as a list of files), when `source` is one and its
    metadata says it is quantized."""
    path = os.path.join(os.fspath(source), OPTIMIZED_LITERT)
    return ([path] if precision_of(metadata) in QUANTIZED_LITERT and os.path.isfile(path)
            else None)


def export_litert_files(export_dir, metadata):
    """The LiteRT files of an export version (a list; empty without any)."""
    record = metadata.get("litert") or {}
    names = record.get("files") or ([record["file"]] if record.get("file") else [])
    return [os.path.join(export_dir, name) for name in names
            if os.path.isfile(os.path.join(export_dir, name))]


def litert_files(path):
    """The LiteRT files at `path` (a list, the prefill's first): an export
    version directory's, or those of a `.tflite` file keras-llm wrote (its
    signatures' files lie beside it as `<stem>.<signature>.tflite`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        metadata = os.path.join(path, EXPORT_METADATA)
        if os.path.isfile(metadata):
            with open(metadata, encoding="utf-8") as handle:
                files = export_litert_files(path, json.load(handle))
            if files:
                return files
        raise ValueError(f"{path} is not an export version with LiteRT files")
    if not (path.endswith(".tflite") and os.path.isfile(path)):
        raise ValueError(f"{path} is not a .tflite file or an export version directory")
    return [path] + sorted(glob.glob(glob.escape(path[:-len(".tflite")]) + ".*.tflite"))


def precision_of(metadata):
    """The LiteRT precision a model should run in: int8 or int4 when its
    metadata says it is quantized so, None for 16-bit models (they run on
    XLA, whose bfloat16/float16 kernels they were made for), else float32."""
    if (metadata or {}).get("dtype") in ("bfloat16", "float16"):
        return None
    mode = (metadata or {}).get("quantization")
    if isinstance(mode, dict):
        mode = mode.get("mode")
    if mode and "int4" in str(mode):
        return "int4"
    return "int8" if mode and ("int8" in str(mode) or mode == "qat") else "float32"
