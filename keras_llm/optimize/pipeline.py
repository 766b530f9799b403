"""`keras-llm optimize`: run optimization steps on a model, write the result
and a report.

Steps, in this order when several are asked for:

1. distillation (`distill_layers`, `distill_steps`): a student with at most
   half the layers, trained on the teacher's distributions;
2. pruning (`prune`, `structure`, `prune_method`, `recovery_steps`): one-shot
   SparseGPT or Wanda on calibration sequences of teacher text, or TF-MOT
   magnitude pruning, of the projections; optionally a recovery fine-tune
   with the masks held by TF-MOT;
3. quantization (`quantize="int8"` post-training, or `"qat"`, TF-MOT
   quantization-aware training for `recovery_steps`, prune-preserving when the
   model was pruned): int8 `QuantizedDense` weights in `model.keras`, plus
   `model.tflite` (LiteRT, dynamic-range int8 with SmoothQuant scales), the
   fast int8 runtime;
4. `dtype` (float16 / bfloat16 weights and compute).

The report has a row for the original model and one after each step (plus
`int8-litert` for the `.tflite`), every row measured the same way
(`keras_llm.optimize.report`). Training steps run under
`keras_llm.optimize.strategy.training_strategy()` and train only on the
teacher's generations (`keras_llm.optimize.teacher_text`); quality is measured
on the evaluation text (`keras_llm.optimize.evaluation`).

With `strategy="multi_worker"` every worker of the `TF_CONFIG` cluster runs
the same command; training is shared, and only the chief publishes the
output, the report and TensorBoard scalars (the others work in a staging
directory that is removed). The recovery fine-tune and QAT back up their state
every `backup_every` steps under `backup_dir` (default `<logdir>/backup`); a
restarted run redoes the steps before the interrupted training (same
result) and resumes that training from its backup.

Everything is written into a staging directory beside `output` and renamed at
the end: an error or Ctrl-C leaves neither `output` nor the report.

Example:
    >>> from keras_llm import optimize
    >>> report = optimize.run("smollm2", "/tmp/smollm2-2of4", "/tmp/2of4.json",
    ...                       prune=0.5, structure="2:4", recovery_steps=100)
"""

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_llm.optimize import evaluation, report as reporting, teacher_text
from keras_llm.optimize._common import clone_with
from keras_llm.optimize.strategy import (STRATEGIES, cluster_from_env, describe, is_chief,
                                         is_multi_worker, task_name, training_strategy)
from keras_llm.optimize.training import (StepLosses, remove_empty_dirs, resume_step,
                                         weights_digest)
from keras_llm.runtime import artifacts

QUANTIZE_MODES = ("int8", "qat", "int4")


@dataclasses.dataclass
class OptimizeOptions:
    """What `run` does. Every field is also a `keras-llm optimize` flag.

    Args:
        prune: target sparsity of the projections (0 < s < 1), None: no pruning.
        structure: "unstructured" or "2:4" (needs prune=0.5).
        prune_method: "sparsegpt" (default), "wanda" or "magnitude".
        calibration_sequences: teacher-text windows of `sequence_length`
            tokens that SparseGPT and Wanda calibrate on.
        recovery_steps: fine-tune steps after pruning, and QAT steps.
        quantize: None, "int8" (post-training), "qat", or "int4" (the LiteRT
            file's projections as 4-bit blocks of 32, `keras_llm.litert_int4`;
            the Keras model stays float32).
        distill_layers: student layers (<= half the teacher's), None: no distillation.
        distill_steps: distillation steps.
        dtype: None, "float16" or "bfloat16".
        eval_tokens: next-token predictions scored on the evaluation text.
        train_tokens: tokens of teacher text to generate for training.
        speed: measure decode tokens/s (batch 1 and 16).
        logdir: distillation checkpoints, TensorBoard scalars, training
            backups and the teacher-text cache (default: `<output>.logs` when
            distilling or training on several workers).
        strategy: "auto" (every local GPU, else the CPU), "mirrored" or
            "multi_worker" (`MultiWorkerMirroredStrategy` over `TF_CONFIG`).
        backup_dir: `BackupAndRestore` directory of the recovery fine-tune and
            QAT (default `<logdir>/backup`, none without a logdir); storage
            every worker sees under multi_worker.
        backup_every: steps between backups.
        batch_size, sequence_length: training batches (`batch_size` is the
            global batch, split over all replicas of all workers).
        learning_rate: recovery fine-tune and QAT; distill_learning_rate for distillation.
        temperature: distillation temperature.
        eval_sequence_length: window length of the evaluation text.
        speed_prompt_tokens, speed_new_tokens, speed_repeats: decode timing setup.
        devices: explicit devices for the training strategy (tests).
        verbose: print progress on stderr.
    """

    prune: float = None
    structure: str = "unstructured"
    prune_method: str = "sparsegpt"
    calibration_sequences: int = 128
    recovery_steps: int = 0
    quantize: str = None
    distill_layers: int = None
    distill_steps: int = 0
    dtype: str = None
    eval_tokens: int = 4096
    train_tokens: int = 16384
    speed: bool = True
    logdir: str = None
    batch_size: int = 4
    sequence_length: int = 128
    learning_rate: float = 5e-5
    distill_learning_rate: float = 2e-4
    temperature: float = 2.0
    eval_sequence_length: int = 256
    speed_prompt_tokens: int = 32
    speed_new_tokens: int = 128
    speed_repeats: int = 3
    devices: tuple = None
    strategy: str = "auto"
    backup_dir: str = None
    backup_every: int = 50
    verbose: bool = True

    def validate(self):
        from keras_llm.optimize.precision import DTYPES  # pylint: disable=import-outside-toplevel
        from keras_llm.optimize.pruning import METHODS, STRUCTURES  # pylint: disable=import-outside-toplevel

        if self.prune is None and self.quantize is None and self.distill_layers is None \
                and self.dtype is None:
            raise ValueError("nothing to do: give at least one of --prune, --quantize, "
                             "--distill-layers, --dtype")
        if self.prune is not None and not 0.0 < self.prune < 1.0:
            raise ValueError(f"--prune must be a sparsity in (0, 1), got {self.prune}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"--structure must be one of {', '.join(STRUCTURES)}, "
                             f"got {self.structure!r}")
        if self.structure == "2:4" and self.prune not in (None, 0.5):
            raise ValueError(f"--structure 2:4 means 50% sparsity; got --prune {self.prune}")
        if self.prune_method not in METHODS:
            raise ValueError(f"--prune-method must be one of {', '.join(METHODS)}, "
                             f"got {self.prune_method!r}")
        if self.structure == "2:4" and self.prune is None:
            raise ValueError("--structure 2:4 needs --prune 0.5")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, "
                             f"got {self.quantize!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype is not None and self.quantize is not None:
            raise ValueError("--dtype and --quantize do not combine: the int8 path keeps "
                             "float32 activations")
        if self.quantize == "qat" and self.recovery_steps <= 0:
            raise ValueError("--quantize qat trains: give --recovery-steps N (N > 0)")
        if self.distill_layers is not None and self.distill_layers < 1:
            raise ValueError(f"--distill-layers must be >= 1, got {self.distill_layers}")
        if self.distill_layers is not None and self.distill_steps < 0:
            raise ValueError("--distill-steps must be >= 0")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        if self.strategy == "multi_worker":
            cluster_from_env()
        for name in ("recovery_steps", "distill_steps", "eval_tokens", "train_tokens",
                     "batch_size", "backup_every", "sequence_length", "calibration_sequences",
                     "speed_repeats", "speed_new_tokens", "speed_prompt_tokens", "eval_sequence_length"):
            value = getattr(self, name)
            minimum = 0 if name in ("recovery_steps", "distill_steps") else 1
            if not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {minimum}, "
                                 f"got {value!r}")

    @property
    def calibrates(self):
        """Pruning that needs calibration sequences (SparseGPT, Wanda)."""
        return self.prune is not None and self.prune_method != "magnitude"

    @property
    def trains(self):
        return (self.prune is not None and self.recovery_steps > 0) or self.quantize == "qat" \
            or (self.distill_layers is not None and self.distill_steps > 0)


def _log(options, message):
    if options.verbose:
        print(f"[optimize] {message}", file=sys.stderr, flush=True)


_INTERRUPTED = threading.Event()
_TRAINING = threading.Event()


def _on_sigint(signum, frame):
    """Ctrl-C. During training it is only remembered and `_Progress` raises
    KeyboardInterrupt at the end of the step: raised wherever the signal
    lands, it could be swallowed inside TensorFlow (training went on) or
    break a C call (`SystemError`). Elsewhere it raises at once."""
    del signum, frame
    _INTERRUPTED.set()
    if not _TRAINING.is_set():
        raise KeyboardInterrupt


class _Progress(keras.callbacks.Callback):
    """Prints `label step/total loss` about 20 times over a training run,
    and stops it at the first step after a Ctrl-C."""

    def __init__(self, label, total, options):
        super().__init__()
        self.label, self.total, self.options = label, int(total), options
        self.start = time.perf_counter()

    def on_train_begin(self, logs=None):
        _TRAINING.set()

    def on_train_end(self, logs=None):
        _TRAINING.clear()

    def on_train_batch_end(self, batch, logs=None):
        if _INTERRUPTED.is_set():
            _TRAINING.clear()
            raise KeyboardInterrupt
        step = batch + 1
        if step % max(1, self.total // 20) == 0 or step == self.total:
            loss = (logs or {}).get("loss")
            loss = "-" if loss is None else f"{float(loss):.4f}"
            _log(self.options, f"{self.label} step {step}/{self.total} loss {loss} "
                               f"({time.perf_counter() - self.start:.0f}s)")


class _TrainingLogs:
    """What the pipeline adds to one training step (`label`): progress,
    per-step losses as TensorBoard scalars (`<logdir>/<label>`, chief only),
    the backup directory (`<backups>/<label>`) and, afterwards, its cleanup
    and a digest of the trained weights on every worker."""

    def __init__(self, label, total, options, strategy, logdir, backups):
        self.label, self.options, self.strategy, self.backups = label, options, strategy, backups
        self.backup_dir = os.path.join(backups, label) if backups else None
        self.resumed_from = resume_step(self.backup_dir)
        if self.resumed_from:
            _log(options, f"{label}: resuming from the backup at step "
                          f"{self.resumed_from}/{total} ({self.backup_dir})")
        writer = None
        if logdir and is_chief(strategy):
            writer = tf.summary.create_file_writer(os.path.join(logdir, label))
        self.losses = StepLosses(writer)
        self.callbacks = [_Progress(label, total, options), self.losses]

    def done(self, model):
        if self.losses.writer is not None:
            self.losses.writer.close()
        if self.backup_dir:
            remove_empty_dirs(self.backup_dir, self.backups)
        if is_multi_worker(self.strategy):
            _log(self.options, f"{self.label}: trained weights sha1 {weights_digest(model)} "
                               f"({task_name(self.strategy)})")
        return {"resumed_from": self.resumed_from,
                "final_loss": self.losses.losses[-1] if self.losses.losses else None}


def _litert_file(model, path, precision, calibration_ids, tokenizer):
    """Write `model` as a dynamic-range int8 or blockwise int4 `.tflite` (the
    one call into `keras_llm.litert`), smoothed on `calibration_ids`, else on
    the tokenizer's calibration text. Returns `(path, runner)` or
    `(None, reason)`."""
    try:
        from keras_llm import litert  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        return None, f"keras_llm.litert is not available ({error}); no model.tflite written"
    from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel

    max_length = min(512, config_from_model(model).context_length)
    if calibration_ids is None and tokenizer is not None:
        calibration_ids = litert.calibration_ids(tokenizer)
    litert.convert(model, path, quantization=precision, calibration_ids=calibration_ids,
                   max_length=max_length)
    return path, litert.LiteRTRunner(path)


class _Measurer:
    """Measures rows of the report, all the same way."""

    def __init__(self, original, tokenizer, options, scratch):
        self.original = original
        self.options = options
        self.scratch = scratch
        self.eval_batches = evaluation.eval_batches(
            tokenizer, options.eval_tokens, options.eval_sequence_length)
        ids = evaluation.eval_token_ids(tokenizer)
        p = options.speed_prompt_tokens
        if len(ids) < 16 * p:
            raise ValueError(f"evaluation text too short for 16 prompts of {p} tokens")
        self.prompts_b1 = [ids[:p]]
        self.prompts_b16 = [ids[i * p:(i + 1) * p] for i in range(16)]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def keras_row(self, variant, model, file_path=None, notes=(), sparse=False):
        """A row for a Keras model; saved into scratch when no file is given
        (with its weights packed sparse when `sparse`)."""
        from keras_llm.saving import save_sparse  # pylint: disable=import-outside-toplevel
        from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime.xla import XLABackend  # pylint: disable=import-outside-toplevel
        from keras_llm.optimize.precision import model_dtype  # pylint: disable=import-outside-toplevel

        _log(self.options, f"measuring {variant}: size")
        temporary = None
        if file_path is None:
            temporary = tempfile.mkdtemp(prefix="measure-", dir=self.scratch)
            file_path = os.path.join(temporary, "model.keras")
            (save_sparse if sparse else type(model).save)(model, file_path)
        try:
            size, gz = os.path.getsize(file_path), reporting.gzip_size(file_path)
        finally:
            if temporary:
                shutil.rmtree(temporary, ignore_errors=True)
        params, nonzero = reporting.count_params(model)
        speed = {}
        if self.options.speed:
            speed = self._speed(variant, reporting.engine_decode(
                XLABackend.from_model(model, max_slots=16)))
        return self._row(variant, "keras-xla", model, params, nonzero, size, gz, speed,
                         dtype=model_dtype(model), layers=config_from_model(model).num_layers,
                         notes=notes)

    def litert_row(self, variant, runner, file_path, source_model, notes=(),
                   dtype="int8 weights (dynamic range)"):
        from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel

        _log(self.options, f"measuring {variant}: size")
        params, nonzero = reporting.count_params(source_model)
        speed = {}
        if self.options.speed:
            from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
            speed = self._speed(variant, reporting.engine_decode(LiteRTBackend(runner)))
        return self._row(variant, "litert-xnnpack", runner, params, nonzero,
                         os.path.getsize(file_path), reporting.gzip_size(file_path), speed,
                         dtype=dtype, layers=config_from_model(source_model).num_layers,
                         notes=notes)

    def _speed(self, variant, generate):
        speed = {}
        for batch, prompts in ((1, self.prompts_b1), (16, self.prompts_b16)):
            _log(self.options, f"measuring {variant}: decode speed, batch {batch}")
            speed[f"b{batch}"] = reporting.decode_speed(
                generate, prompts, self.options.speed_new_tokens, self.options.speed_repeats)
        return speed

    def _row(self, variant, runtime, model, params, nonzero, size, gz, speed, **extra):
        from keras_llm.optimize.metrics import perplexity_and_fidelity  # pylint: disable=import-outside-toplevel

        _log(self.options, f"measuring {variant}: quality on the evaluation text")
        quality = perplexity_and_fidelity(model, self.original, self.eval_batches)
        row = {"variant": variant, "params": int(params), "nonzero_params": int(nonzero),
               "size_bytes": int(size), "gzip_bytes": int(gz),
               "decode_tps_b1": speed["b1"]["median"] if speed else None,
               "decode_tps_b16": speed["b16"]["median"] if speed else None,
               "perplexity": quality["perplexity"], "mean_kl": quality["mean_kl"],
               "top1_agreement": quality["top1_agreement"], "runtime": runtime,
               "speed": speed, "notes": list(extra.pop("notes", ()))}
        row.update(extra)
        self.positions = quality["positions"]
        _log(self.options, f"{variant}: perplexity {row['perplexity']:.3f}, KL "
                           f"{row['mean_kl']:.4f}, top-1 {row['top1_agreement']:.3f}, "
                           f"b1 {row['decode_tps_b1']} tok/s, b16 {row['decode_tps_b16']} tok/s")
        return row


def _variant_name(steps):
    return "+".join(steps)


def _check_sparsity(path, options):
    """Sparsity of the projection kernels as stored in `path`; raises if the
    file does not have what pruning claimed."""
    from keras_llm.optimize.pruning import measure_sparsity  # pylint: disable=import-outside-toplevel

    measured = measure_sparsity(path)
    if options.structure == "2:4":
        if not measured["two_four"]:
            raise RuntimeError(f"{path}: projection kernels are not 2:4 sparse")
    else:
        low = min(layer["sparsity"] for layer in measured["layers"].values())
        if low < options.prune - 0.01:
            raise RuntimeError(f"{path}: a projection kernel has sparsity {low:.3f} "
                               f"< {options.prune}")
    return {"overall": measured["overall"], "two_four": measured["two_four"],
            "min_layer": min(l["sparsity"] for l in measured["layers"].values())}


def run(model, output, report_path, options=None, **kwargs):
    """Optimize `model` and write it to `output`, with a report at `report_path`.

    Args:
        model: a preset name, model directory or file (as `keras_llm.load`),
            or a `LanguageModel`.
        output: model directory to write (replaced if it exists).
        report_path: JSON report path; the Markdown goes beside it (`.md`).
        options: an `OptimizeOptions`, or its fields as keywords.

    Returns:
        The report dict (as written).
    """
    if options is None:
        options = OptimizeOptions(**kwargs)
    elif kwargs:
        raise TypeError("give options or keywords, not both")
    options.validate()
    output = os.path.abspath(os.fspath(output))
    report_path = os.path.abspath(os.fspath(report_path))
    if not report_path.lower().endswith(".json"):
        raise ValueError(f"--report must be a .json path, got {report_path}")
    if os.path.isdir(report_path):
        raise ValueError(f"--report {report_path} is a directory")
    source = None if not isinstance(model, (str, os.PathLike)) else \
        os.path.abspath(os.fspath(model))
    if source and (source == output or source.startswith(output + os.sep)):
        raise ValueError("--output must not be the input model (it is replaced)")
    if os.path.isfile(output):
        raise ValueError(f"--output {output} is a file; give a directory path")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
    strategy = training_strategy(options.devices, options.strategy)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.staging-", dir=parent)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main else None
    _INTERRUPTED.clear()
    _TRAINING.clear()
    try:
        try:
            report, staged = _run(model, output, report_path, options, staging, strategy)
        except (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError) as error:
            if not is_multi_worker(strategy):
                raise
            raise RuntimeError(
                f"{task_name(strategy)}: lost a worker of the cluster ({type(error).__name__}); "
                "MultiWorkerMirroredStrategy cannot go on without it. Restart every worker "
                "with the same command: training resumes from its backup") from error
        if is_chief(strategy):
            _publish(staging, output, staged)
        else:
            _log(options, f"{task_name(strategy)}: not the chief, nothing published")
        return report
    finally:
        _TRAINING.clear()
        if main:
            signal.signal(signal.SIGINT, previous)
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging, output, staged):
    """Rename the staged model directory and report files into place."""
    backup = None
    if os.path.exists(output):
        backup = os.path.join(staging, "previous-output")
        os.replace(output, backup)
    published = []
    try:
        os.replace(os.path.join(staging, "model"), output)
        published.append(output)
        for staged_path, final in staged:
            os.replace(staged_path, final)
            published.append(final)
    except BaseException:
        for path in published:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
        if backup:
            os.replace(backup, output)
        raise
    if backup:
        shutil.rmtree(backup, ignore_errors=True)


def _run(model_spec, output, report_path, options, staging, strategy):
    from keras_llm.language_model import LanguageModel, load  # pylint: disable=import-outside-toplevel
    from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel
    from keras_llm.saving import save_model_dir  # pylint: disable=import-outside-toplevel

    started = time.perf_counter()
    if isinstance(model_spec, LanguageModel):
        lm, spec_name = model_spec, model_spec.metadata.get("source", "LanguageModel")
    else:
        _log(options, f"loading {model_spec}")
        lm, spec_name = load(model_spec, progress=options.verbose), os.fspath(model_spec)
    original, tokenizer = lm.model, lm.tokenizer
    config = config_from_model(original)
    if options.distill_layers is not None and options.distill_layers > config.num_layers // 2:
        raise ValueError(f"--distill-layers {options.distill_layers}: a student has at most "
                         f"half the teacher's {config.num_layers} layers "
                         f"(<= {config.num_layers // 2})")
    scratch = os.path.join(staging, "scratch")
    os.makedirs(scratch)
    multi_worker = is_multi_worker(strategy)
    logdir = options.logdir or (output + ".logs" if options.distill_layers or multi_worker
                                else None)
    backups = options.backup_dir or (os.path.join(logdir, "backup") if logdir else None)
    if multi_worker:
        _log(options, f"{task_name(strategy)}, {describe(strategy)}")
    measurer = _Measurer(original, tokenizer, options, scratch)

    # The original's own file when it has one (no second save to measure).
    original_file = (os.path.join(lm.source, artifacts.MODEL_FILE)
                     if lm.source and artifacts.is_model_dir(lm.source) else None)
    rows = [measurer.keras_row("original", original, original_file)]
    steps, notes, record = [], [], {}
    train_ids = None
    int8_calibration = options.quantize in ("int8", "qat")  # int4: no teacher text needed
    if options.trains or int8_calibration or options.calibrates:
        needed = max(4096 if int8_calibration else 0,
                     options.calibration_sequences * options.sequence_length
                     if options.calibrates else 0)
        tokens = options.train_tokens if options.trains else min(options.train_tokens, needed)
        _log(options, f"generating {tokens} tokens of teacher text for training/calibration")
        train_ids = teacher_text.teacher_token_stream(
            lm, tokens, cache_dir=os.path.join(logdir, "teacher_text") if logdir else None,
            verbose=options.verbose)
    train_batches = None
    if train_ids is not None:
        train_batches = teacher_text.training_batches(train_ids, options.batch_size,
                                                      options.sequence_length)

    current = original
    pending = []  # (variant, model) rows measured after the final save
    if options.distill_layers is not None:
        from keras_llm.optimize.distill import distill, make_student  # pylint: disable=import-outside-toplevel

        with strategy.scope():
            current, layer_map = make_student(original, options.distill_layers)
        steps.append(f"student-{options.distill_layers}L")
        record["distillation"] = {"student_layers": options.distill_layers,
                                  "teacher_layers": config.num_layers, "layer_map": layer_map,
                                  "steps": options.distill_steps,
                                  "temperature": options.temperature, "logdir": logdir}
        if options.distill_steps:
            _log(options, f"distilling to {options.distill_layers} layers for "
                          f"{options.distill_steps} steps ({describe(strategy)}), logs in {logdir}")
            info = distill(original, current, train_batches, options.distill_steps,
                           options.temperature, options.distill_learning_rate, logdir, strategy,
                           eval_batches=measurer.eval_batches[:2],
                           eval_every=max(1, options.distill_steps // 4),
                           verbose=options.verbose)
            record["distillation"].update(resumed_from=info["resumed_from"],
                                          final_loss=info["final_loss"])
        pending.append((_variant_name(steps), current, {}))

    if options.prune is not None:
        from keras_llm.optimize.pruning import prune  # pylint: disable=import-outside-toplevel

        label = "pruned-2:4" if options.structure == "2:4" else f"pruned-{options.prune:.0%}"
        recovery = options.recovery_steps if train_batches is not None else 0
        calibration = None
        if options.calibrates:
            length = options.sequence_length
            windows = len(train_ids) // length
            calibration = train_ids[:windows * length].reshape(windows, length)[
                :options.calibration_sequences]
        _log(options, f"pruning {options.structure} to {options.prune:.0%} by "
                      f"{options.prune_method}"
                      + (f" on {len(calibration)} calibration sequences of {length} tokens"
                         if calibration is not None else "")
                      + (f", recovery fine-tune {recovery} steps ({describe(strategy)})"
                         if recovery else ", one-shot"))

        def block_done(block, blocks, seconds):
            if (block + 1) % max(1, blocks // 5) == 0 or block + 1 == blocks:
                _log(options, f"pruned block {block + 1}/{blocks} ({seconds:.0f}s)")

        logs = _TrainingLogs("recovery", recovery, options, strategy, logdir, backups) \
            if recovery else None
        with strategy.scope():
            current, info = prune(
                current, options.prune, options.structure,
                fine_tune_data=train_batches if recovery else None, steps=recovery,
                learning_rate=options.learning_rate, return_info=True,
                callbacks=logs.callbacks if logs else (), method=options.prune_method,
                calibration_ids=calibration, progress=block_done,
                backup_dir=logs.backup_dir if logs else None,
                backup_every=options.backup_every)
        trained = logs.done(current) if logs else {}
        steps.append(label)
        record["pruning"] = {"label": label, "structure": options.structure,
                             "target_sparsity": options.prune, "method": options.prune_method,
                             "calibration": info.get("one_shot"),
                             "recovery_steps": recovery, "layers": "attention and MLP "
                             "projections (query, key, value, attention_output, mlp_gate, "
                             "mlp_up, mlp_down); not the tied embedding/head, not the norms",
                             "wrappers": len(info["wrappers"]),
                             "update_pruning_step_reached": len(info.get("callback_reached",
                                                                         info["wrappers"])),
                             **trained}
        pending.append((_variant_name(steps), current, {"pruning": record["pruning"]}))

    float_model = current
    if options.quantize == "int4":
        steps.append("int4")
        record["quantization"] = {"mode": "int4", "scheme": "LiteRT only: projections as 4-bit "
                                  "codes by blocks of 32 inputs with a scale and a minimum "
                                  "(Q4_1's layout; a Q4_1 GGUF's own codes), run as XNNPACK "
                                  "blockwise int4 plus block offsets; output projection int8 "
                                  "per channel; the Keras model stays float32"}
    elif options.quantize is not None:
        from keras_llm.optimize.quantize import (  # pylint: disable=import-outside-toplevel
            float_model_from_qat, quantization_aware_fine_tune, quantize_model)

        if options.quantize == "qat":
            _log(options, f"quantization-aware training, {options.recovery_steps} steps "
                          f"({describe(strategy)})"
                          + (", prune-preserving" if options.prune is not None else ""))
            logs = _TrainingLogs("qat", options.recovery_steps, options, strategy, logdir,
                                 backups)
            with strategy.scope():
                current, wrapped = quantization_aware_fine_tune(
                    float_model, train_batches, options.recovery_steps, options.learning_rate,
                    preserve_zeros=options.prune is not None, callbacks=logs.callbacks,
                    backup_dir=logs.backup_dir, backup_every=options.backup_every)
                float_model = float_model_from_qat(wrapped, float_model)
            record["qat"] = logs.done(current)
            steps.append("qat-int8")
        else:
            _log(options, "post-training int8 weight quantization")
            current = quantize_model(float_model)
            steps.append("int8")
        record["quantization"] = {"mode": options.quantize, "scheme": "int8 symmetric "
                                  "per-output-channel weights of the projections "
                                  "(QuantizedDense); embedding/head and norms float32",
                                  "prune_preserving": options.prune is not None}
        pending.append((_variant_name(steps), current, {}))

    if options.dtype is not None:
        from keras_llm.optimize.precision import cast_model  # pylint: disable=import-outside-toplevel

        _log(options, f"casting to {options.dtype}")
        current = cast_model(current, options.dtype)
        steps.append(options.dtype)
        record["dtype"] = {"dtype": options.dtype, "float32": "RMSNorm math, attention "
                           "scores and softmax, output logits, sampling"}
        pending.append((_variant_name(steps), current, {}))

    # ----- the output directory --------------------------------------------
    final_config = config_from_model(current)
    metadata = {key: value for key, value in lm.metadata.items()
                if key not in ("format", "format_version")}
    from keras_llm.optimize.precision import model_dtype  # pylint: disable=import-outside-toplevel

    metadata.update(
        config=final_config.to_dict(), dtype=model_dtype(current),
        quantization=({"int4": "int4-blockwise-weights"}.get(options.quantize,
                                                              "int8-per-channel-weights")
                      if options.quantize else None),
        optimized_from=spec_name, optimize={"steps": steps, **record})
    model_dir = os.path.join(staging, "model")
    _log(options, f"saving {output}" if is_chief(strategy) else
         "saving into the staging directory (removed: only the chief publishes)")
    # Pruned weights are stored sparse (mask + nonzeros): `keras_llm.saving`.
    sparse = options.prune is not None
    saved = None
    if options.prune is not None and options.quantize in (None, "int4"):
        # Checked in the file that ships (saved once), then recorded in the metadata.
        from keras_llm.saving import save_sparse  # pylint: disable=import-outside-toplevel

        saved = save_sparse(current, os.path.join(scratch, "model.keras"))
        metadata["sparsity"] = {"structure": options.structure, "target": options.prune,
                                **_check_sparsity(saved, options)}
    elif options.prune is not None:
        metadata["sparsity"] = {"structure": options.structure, "target": options.prune}
    save_model_dir(model_dir, current, tokenizer, metadata, sparse=sparse, saved_file=saved)
    model_file = os.path.join(model_dir, "model.keras")

    tflite = None
    if options.quantize is not None:
        precision = "int4" if options.quantize == "int4" else "int8"
        _log(options, f"converting to LiteRT {precision} (model.tflite)")
        calibration = train_ids[: 4 * options.sequence_length].reshape(4, -1) \
            if train_ids is not None and len(train_ids) >= 4 * options.sequence_length else None
        # A fresh copy: after strip_pruning/QAT some layers are shared with
        # the training model, and conversion reads layer outputs by graph.
        fresh = clone_with(float_model, lambda fresh_layer, original_layer: None)
        tflite, runner = _litert_file(fresh, os.path.join(model_dir, "model.tflite"),
                                      precision, calibration, tokenizer)
        if tflite is None:
            notes.append(runner)

    # ----- rows after each step ---------------------------------------------
    for variant, model, extra in pending:
        final = model is current
        row = measurer.keras_row(variant, model, model_file if final else None,
                                 sparse=sparse and record["pruning"]["label"] in variant.split("+"))
        row.update(extra)
        if final and "min_layer" in (metadata.get("sparsity") or {}):
            row["sparsity_on_disk"] = metadata["sparsity"]
        rows.append(row)
    if tflite is not None and options.quantize == "int4":
        rows.append(measurer.litert_row(
            _variant_name(steps) + "-litert", runner, tflite, float_model,
            dtype="int4 weights (blockwise, 32) + int8 output projection",
            notes=["int4 runtime: LiteRT interpreter with XNNPACK's blockwise 4-bit kernels "
                   "(activations quantized to 8 bits per row on the fly) plus int8 block "
                   "offsets"]))
    elif tflite is not None:
        rows.append(measurer.litert_row(_variant_name(steps) + "-litert", runner, tflite,
                                        float_model,
                                        notes=["int8 runtime: LiteRT interpreter with XNNPACK, "
                                               "dynamic-range int8 weights, SmoothQuant scales"]))
    if options.quantize in ("int8", "qat"):
        rows[-2 if tflite is not None else -1]["notes"].append(
            "int8 QuantizedDense in Keras: int8 on disk, dequantized per call by XLA "
            "(no int8 kernels), so about float32 speed; the fast int8 path is the -litert row")
    if options.dtype is not None:
        rows[-1]["notes"].append(
            f"{options.dtype} on this CPU through XLA; see the speed columns against the "
            "original row measured in the same run")

    report = {
        "model": spec_name, "output": output, "steps": steps, "created": reporting.timestamp(),
        "machine": reporting.machine(), "strategy": describe(strategy),
        "eval": {"text": evaluation.EVAL_TEXT_DESCRIPTION, "tokens": options.eval_tokens,
                 "sequence_length": options.eval_sequence_length,
                 "positions": measurer.positions},
        "training_text": (f"teacher generations from {len(teacher_text.prompts(1000))} "
                          f"varied prompts, {len(train_ids)} tokens"
                          if train_ids is not None else None),
        "speed_setup": {"prompt_tokens": options.speed_prompt_tokens,
                        "max_new_tokens": options.speed_new_tokens,
                        "repeats": options.speed_repeats, "enabled": options.speed},
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "devices"},
        "details": record, "row_keys": list(reporting.ROW_KEYS), "rows": rows,
        "targets": reporting.targets(rows, config.num_layers), "notes": notes,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    staged = reporting.write_staged(report, report_path, staging)
    _log(options, f"done in {report['elapsed_s']:.0f}s")
    return report, staged
