"""Pruning of a keras-llm model: one-shot with calibration data (SparseGPT,
Wanda: `keras_llm.optimize.one_shot`) or by magnitude, with TF-MOT holding
the masks through any recovery fine-tune.

Only the attention and MLP projections (`layer_{i}_query|key|value|
attention_output|mlp_gate|mlp_up|mlp_down`, plain `Dense` layers) are pruned:

- the token embedding is also the output head (tied weights, called with
  `reverse=True`), so zeroing rows or entries of it damages both the input
  lookup and every logit; in SmolLM2-135M it is 28M of 135M parameters and
  the most sensitive matrix of the model;
- the RMSNorm scales are one vector per norm (hidden_dim values), nothing
  to gain and a lot to lose.

Pruning gives no speed-up in TensorFlow by itself; it gives compressibility
(zeros) and, for 2:4, the pattern sparse kernels elsewhere can use.

Example:
    >>> pruned = prune(model, target_sparsity=0.5)
    >>> measure_sparsity(pruned)["overall"]
    0.5
"""

import json
import os
import tempfile
import zipfile

import numpy as np
import tensorflow as tf
import tf_keras as keras
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from keras_llm.models.llama import unwrap
from keras_llm.optimize._common import clone_with, projection_layers, _PROJECTION_RE
from keras_llm.optimize.training import fit_steps

STRUCTURES = ("unstructured", "2:4")
SCHEDULES = ("constant", "polynomial", "fixed")
# The first is the default: the best measured on SmolLM2 (README, "Optimize").
METHODS = ("sparsegpt", "wanda", "magnitude")

# A pruning step TF-MOT never reaches: the "fixed" schedule keeps the masks
# it is given.
_NEVER = 2 ** 30


def _pruning_params(structure, target_sparsity, schedule, steps):
    sparsity = tfmot.sparsity.keras
    if schedule == "fixed":
        # Masks set from the weights' zeros (`hold_zeros`), never recomputed:
        # TF-MOT's 2:4 option would recompute them at step 1, so it is not
        # passed, whatever the structure.
        return {"pruning_schedule": sparsity.ConstantSparsity(
            target_sparsity, begin_step=_NEVER, frequency=1)}
    if schedule == "polynomial":
        # Ramp 0 -> target over the first half of the steps; the last mask
        # update must land on end_step, a multiple of the frequency.
        end = max(1, (steps - 1) // 2)
        frequency = max(1, end // 10)
        end = frequency * (end // frequency)
        pruning_schedule = sparsity.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=target_sparsity,
            begin_step=0, end_step=end, frequency=frequency)
    else:
        # One-shot at step 1, then recomputed (same level) every 100 steps:
        # step 1 must be a pruning turn, (1 - begin_step) % frequency == 0,
        # or a fine-tune of fewer than 100 steps never applies a mask.
        pruning_schedule = sparsity.ConstantSparsity(
            target_sparsity, begin_step=1, frequency=1 if steps <= 1 else 100)
    params = {"pruning_schedule": pruning_schedule}
    if structure == "2:4":
        # TF-MOT computes the 2:4 mask once, at pruning step 1, and ignores
        # the schedule's sparsity.
        params["sparsity_m_by_n"] = (2, 4)
    return params


def prunable_wrappers(model):
    """The `PruneLowMagnitude` wrappers that `UpdatePruningStep` will see."""
    return pruning_wrapper.collect_prunable_layers(model)


def wrap_for_pruning(model, target_sparsity=0.5, structure="unstructured",
                     schedule="constant", steps=1, kinds=None):
    """Clone `model` with its projection `Dense` layers in `PruneLowMagnitude`.

    The wrappers are top-level layers of the returned Functional model (so
    `UpdatePruningStep` finds all of them); every other layer is a fresh copy
    with the same weights, so `model` itself is never modified.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity!r}")
    if structure == "2:4" and target_sparsity != 0.5:
        raise ValueError("2:4 sparsity is 0.5 by definition; pass target_sparsity=0.5")
    targets = {layer.name for layer in projection_layers(model, kinds)}
    if not targets:
        raise ValueError(f"model {model.name!r} has no projection Dense layers to prune")
    params = _pruning_params(structure, target_sparsity, schedule, steps)

    def replace(fresh, original):
        if original.name in targets:
            return tfmot.sparsity.keras.prune_low_magnitude(fresh, **params)
        return None

    wrapped = clone_with(model, replace)
    found = {unwrap(w).name for w in prunable_wrappers(wrapped)}
    if found != targets:
        raise RuntimeError(f"UpdatePruningStep would miss wrappers: {sorted(targets - found)}")
    return wrapped


def apply_masks_now(wrapped, step=1):
    """One-shot pruning: compute every wrapper's mask at `step` and apply it."""
    for wrapper in prunable_wrappers(wrapped):
        wrapper.pruning_step.assign(step)
        wrapper.pruning_obj.conditional_mask_update()
        wrapper.pruning_obj.weight_mask_op()


def hold_zeros(wrapped):
    """Set every wrapper's mask to the kernel's nonzeros (for the "fixed"
    schedule): training then keeps each zero at zero."""
    for wrapper in prunable_wrappers(wrapped):
        for weight, mask, _ in wrapper.pruning_vars:
            mask.assign(tf.cast(tf.not_equal(weight, 0), mask.dtype))


def fine_tune(wrapped, batches, steps, learning_rate=1e-4, verbose=0, callbacks=(),
              backup_dir=None, backup_every=50):
    """Next-token cross-entropy training of a wrapped model, `steps` batches.

    `batches`: a list of `(B, T)` token-id arrays, cycled (B is the global
    batch). Runs `keras_llm.optimize.training.fit_steps` with
    `UpdatePruningStep()`, resuming from `backup_dir` when it holds a backup,
    and returns `(history, callback, resumed_from)`; the callback's
    `prunable_layers` lists the wrappers it reached.
    """
    wrapped.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = tfmot.sparsity.keras.UpdatePruningStep()
    history, resumed = fit_steps(wrapped, batches, steps, [callback, *callbacks], verbose,
                                 backup_dir, backup_every)
    return history, callback, resumed


def prune(model, target_sparsity=0.5, structure="unstructured", fine_tune_data=None,
          steps=100, learning_rate=1e-4, schedule="constant", kinds=None,
          return_info=False, verbose=0, callbacks=(), method="magnitude",
          calibration_ids=None, progress=None, backup_dir=None, backup_every=50):
    """Prune the projection `Dense` kernels of a keras-llm model.

    Args:
        model: a keras-llm Functional model (not modified).
        target_sparsity: fraction of zeros in each pruned kernel
            (`structure="2:4"` needs 0.5).
        structure: "unstructured" (per kernel) or "2:4" (in every 4
            consecutive weights along the input axis, 2 are 0).
        method: "magnitude" (TF-MOT's own masks), or "sparsegpt" / "wanda"
            (one-shot from `calibration_ids`, then masks held fixed by TF-MOT
            through the fine-tune; `schedule` does not apply).
        calibration_ids: `(N, T)` token ids for "sparsegpt" and "wanda".
        progress: `fn(block, blocks, seconds)` during one-shot pruning.
        fine_tune_data: optional list of `(B, T)` token-id arrays for a short
            recovery fine-tune (next-token cross-entropy). None: one-shot.
        steps: fine-tune steps (batches).
        learning_rate: Adam learning rate of the fine-tune.
        schedule: "constant" (`ConstantSparsity`: prune once at step 1, then
            train with the mask) or "polynomial" (`PolynomialDecay`: ramp from 0
            to the target over the first half of the steps; needs data).
        kinds: which projections, e.g. ("mlp_gate", "mlp_up"); None: all 7.
        return_info: also return a dict: wrappers reached, step counters.
        callbacks: extra Keras callbacks for the fine-tune (progress, ...).
        backup_dir, backup_every: `BackupAndRestore` of the fine-tune
            (`keras_llm.optimize.training.fit_steps`); a run given the
            directory of an interrupted one goes on from its last backup.

    Returns:
        The pruned model, wrappers stripped (plain `Dense` layers with zeros),
        uncompiled; with `return_info`, `(model, info)`.

    Note:
        TF-MOT's `PruneLowMagnitude` increments its own `pruning_step` on
        every training call; `UpdatePruningStep` only sets it from -1 to 0 at
        the start and re-applies the masks at each epoch end. A wrapper that
        is not a top-level layer of the model is never found by it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fine_tune_data is None and schedule == "polynomial":
        raise ValueError("schedule='polynomial' prunes during training: give fine_tune_data")
    train = fine_tune_data is not None and steps > 0
    one_shot_info = None
    if method != "magnitude":
        if calibration_ids is None:
            raise ValueError(f"method={method!r} needs calibration_ids (N, T) token ids")
        if kinds is not None:
            raise ValueError(f"method={method!r} prunes every projection; kinds is for magnitude")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        from keras_llm.optimize.one_shot import prune_one_shot  # pylint: disable=import-outside-toplevel

        model = clone_with(model, lambda fresh, original: None)
        one_shot_info = prune_one_shot(model, calibration_ids, target_sparsity, structure,
                                       method, progress=progress)
        if not train:
            info = {"wrappers": [layer.name for layer in projection_layers(model)],
                    "one_shot": one_shot_info}
            return (model, info) if return_info else model
        schedule = "fixed"
    wrapped = wrap_for_pruning(model, target_sparsity, structure, schedule,
                               steps if train else 1, kinds)
    wrappers = prunable_wrappers(wrapped)
    info = {"wrappers": [unwrap(w).name for w in wrappers]}
    if one_shot_info is not None:
        info["one_shot"] = one_shot_info
    if schedule == "constant":
        apply_masks_now(wrapped, step=1)
    elif schedule == "fixed":
        hold_zeros(wrapped)
    if train:
        before = {unwrap(w).name: int(w.pruning_step.numpy()) for w in wrappers}
        history, callback, resumed = fine_tune(wrapped, fine_tune_data, steps, learning_rate,
                                               verbose, callbacks, backup_dir, backup_every)
        after = {unwrap(w).name: int(w.pruning_step.numpy()) for w in wrappers}
        info.update(
            callback_reached=sorted(unwrap(w).name for w in callback.prunable_layers),
            steps_before=before, steps_after=after, resumed_from=resumed,
            loss=[float(v) for v in history.history.get("loss", [])])
    # Make sure the stored weights are weights * mask (TF-MOT does this at
    # epoch end; a one-shot run never trains).
    for wrapper in wrappers:
        wrapper.pruning_obj.weight_mask_op()
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    return (stripped, info) if return_info else stripped


# ----- measuring ------------------------------------------------------------

def _kernels_from_model(model):
    return {layer.name: layer.kernel.numpy() for layer in projection_layers(model)}


def _kernels_from_file(path):
    """Projection kernels read straight from a `.keras` archive's HDF5 weights.

    tf_keras stores layer variables under `.../layers/<class_snake>[_N]/vars/<i>`
    in `model.weights.h5`, with the layer order of `config.json`; the Keras
    layer names are not in the file, so they come from the config.
    """
    import h5py  # pylint: disable=import-outside-toplevel

    from keras_llm.saving import extract_weights  # pylint: disable=import-outside-toplevel

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        with tempfile.TemporaryDirectory(prefix="keras_llm_") as tmp:
            weights_path = extract_weights(archive, os.path.join(tmp, "model.weights.h5"))
            with h5py.File(weights_path, "r") as h5:
                return _match_h5_to_config(h5, config)


def _match_h5_to_config(h5, config):
    layers = config["config"]["layers"]
    # Keras names each layer's weights group after its class in snake case,
    # numbering repeats in model.layers order: dense, dense_1, dense_2, ...
    counts, groups = {}, {}
    for entry in layers:
        snake = _snake(entry["class_name"])
        n = counts.get(snake, 0)
        counts[snake] = n + 1
        groups[entry["config"]["name"]] = snake if n == 0 else f"{snake}_{n}"
    kernels = {}
    for entry in layers:
        name = entry["config"]["name"]
        if entry["class_name"] != "Dense" or not _PROJECTION_RE.match(name):
            continue
        group = h5["layers"][groups[name]]["vars"]
        kernels[name] = _stored_array(group["0"])
    return kernels


def _stored_array(dataset):
    """An HDF5 weight as numpy; bfloat16 (stored by tf_keras as 2-byte
    opaque data) comes back widened to float32, exactly."""
    value = np.asarray(dataset)
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        bits = np.frombuffer(value.tobytes(), np.uint16).astype(np.uint32) << 16
        value = bits.view(np.float32).reshape(value.shape)
    return value


def _snake(name):
    import re  # pylint: disable=import-outside-toplevel

    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def two_four_ok(kernel):
    """True when every 4 consecutive input-axis weights of each output
    column of a `(in, out)` kernel hold at least 2 zeros."""
    kernel = np.asarray(kernel)
    rows = kernel.shape[0]
    if rows % 4:
        return False
    groups = kernel.T.reshape(kernel.shape[1], rows // 4, 4)
    return bool(np.all(np.sum(groups == 0, axis=-1) >= 2))


def measure_sparsity(model_or_path):
    """Sparsity of the projection kernels of a model or a saved `.keras` file.

    Given a path, the kernels are read from the file's stored weights (no
    model is built), so the report says what is really on disk.

    Returns:
        {"layers": {name: {"zeros", "size", "sparsity", "two_four"}},
         "zeros", "size", "overall" (zeros / size over all projections),
         "two_four" (every projection kernel satisfies 2:4)}
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        kernels = _kernels_from_file(os.fspath(model_or_path))
    else:
        kernels = _kernels_from_model(model_or_path)
    if not kernels:
        raise ValueError("no projection kernels found")
    layers, zeros, size = {}, 0, 0
    for name, kernel in kernels.items():
        z = int(np.sum(kernel == 0))
        layers[name] = {"zeros": z, "size": int(kernel.size),
                        "sparsity": z / kernel.size, "two_four": two_four_ok(kernel)}
        zeros += z
        size += kernel.size
    return {"layers": layers, "zeros": zeros, "size": int(size), "overall": zeros / size,
            "two_four": all(v["two_four"] for v in layers.values())}
