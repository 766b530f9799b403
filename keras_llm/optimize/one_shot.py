"""One-shot pruning with calibration data: SparseGPT and Wanda.

Magnitude pruning looks at each weight alone; these methods also look at
what flows through it. Both run block by block over a few hundred
calibration sequences (the teacher's own text, never the evaluation text):

1. the calibration sequences go through the embedding once;
2. for each block, a sub-model of the model's own Functional graph (from the
   block's input to its output, plus the inputs of its seven projections)
   runs on the current hidden states, and each projection's input second
   moment `H = X^T X / n` is accumulated;
3. every projection kernel of the block is pruned with its `H`;
4. the block, now pruned, runs again to give the next block its input, so
   later blocks see (and correct for) the error of earlier ones.

Methods (`W` is a kernel as `(out, in)`):

- `wanda` (Sun et al. 2023): score `|W_ij| * ||X_j||`, remove the lowest
  scores within each output row (or within each group of 4 inputs for 2:4);
  no weight changes.
- `sparsegpt` (Frantar & Alistarh 2023): remove the weights of least
  `w^2 / [H^-1]_jj^2`, column block by column block, and move each removed
  weight's error onto the weights not yet visited (the optimal-brain-surgeon
  update with the Cholesky factor of `H^-1`), so the layer's output on the
  calibration inputs changes as little as possible.

The result is a plain tf_keras model with zeros in its projection kernels
(exactly the target fraction in each kernel, or 2 of every 4 consecutive
inputs); `keras_llm.optimize.pruning.prune` then keeps those zeros through a
recovery fine-tune with TF-MOT.
"""

import time

import numpy as np
import tf_keras as keras

from keras_llm.models.llama import PROJECTIONS

METHODS = ("sparsegpt", "wanda")

# Projections of a block grouped by the tensor they read: one `H` each.
_INPUT_GROUPS = (("query", "key", "value"), ("attention_output",),
                 ("mlp_gate", "mlp_up"), ("mlp_down",))


def block_model(model, index):
    """`hidden (B, T, H) -> [next hidden, one input per group of projections]`
    for block `index`, cut from `model`'s own graph (no copy of its math)."""
    prefix = f"layer_{index}_"
    hidden = model.get_layer(prefix + "attention_norm").input
    outputs = [model.get_layer(prefix + "mlp_residual").output]
    outputs += [model.get_layer(prefix + group[0]).input for group in _INPUT_GROUPS]
    return keras.Model(hidden, outputs, name=f"block_{index}")


def embedding_model(model):
    """`token_ids -> the first block's input` from `model`'s graph."""
    return keras.Model(model.input, model.get_layer("layer_0_attention_norm").input,
                       name="embedding")


def wanda_mask(weight, h_diag, sparsity, structure):
    """Boolean mask of the weights to remove from `weight (out, in)`."""
    score = np.abs(weight) * np.sqrt(np.maximum(h_diag, 0.0))[None, :]
    rows, cols = weight.shape
    mask = np.zeros(weight.shape, bool)
    if structure == "2:4":
        groups = score.reshape(rows, cols // 4, 4)
        lowest = np.argsort(groups, axis=-1, kind="stable")[..., :2]
        np.put_along_axis(mask.reshape(rows, cols // 4, 4), lowest, True, axis=-1)
    else:
        k = int(round(cols * sparsity))
        lowest = np.argsort(score, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, lowest, True, axis=1)
    return mask


def inverse_cholesky(h, damp=0.01):
    """Upper Cholesky factor of `(H + damp * mean(diag H) * I)^-1` (float64),
    and the columns that saw no input (diagonal 0)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    # inv(H) = inv(L)^T inv(L) with H = L L^T; its upper factor is the
    # transpose of the lower Cholesky factor of inv(H).
    inverse = np.linalg.inv(h)
    inverse = (inverse + inverse.T) / 2
    return np.linalg.cholesky(inverse).T, dead


def sparsegpt(weight, hinv, dead, sparsity, structure, block_size=128):
    """Prune `weight (out, in)` with the upper Cholesky factor `hinv` of its
    damped inverse Hessian; returns the pruned, error-corrected weights."""
    w = np.array(weight, np.float32)
    w[:, dead] = 0.0
    hinv = hinv.astype(np.float32)
    rows, cols = w.shape
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].copy()
        h_block = hinv[start:end, start:end]
        diag = np.diag(h_block)
        errors = np.zeros_like(block)
        mask = np.zeros(block.shape, bool)
        if structure != "2:4":
            score = block ** 2 / diag[None, :] ** 2
            k = int(round(score.size * sparsity))
            mask.flat[np.argsort(score, axis=None, kind="stable")[:k]] = True
        for j in range(end - start):
            if structure == "2:4" and j % 4 == 0:
                score = block[:, j:j + 4] ** 2 / diag[None, j:j + 4] ** 2
                lowest = np.argsort(score, axis=1, kind="stable")[:, :2]
                np.put_along_axis(mask[:, j:j + 4], lowest, True, axis=1)
            column = block[:, j]
            kept = np.where(mask[:, j], 0.0, column)
            error = (column - kept) / diag[j]
            block[:, j:] -= np.outer(error, h_block[j, j:])
            block[:, j] = kept
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w


def _relative_output_error(weight, pruned, moment):
    """`||(W - W') X|| / ||W X||` from the inputs' second moment."""
    moment = moment.astype(np.float32)
    delta = weight - pruned
    moved = float(np.sum((delta @ moment) * delta))
    total = float(np.sum((weight @ moment) * weight))
    return float(np.sqrt(max(moved, 0.0) / max(total, 1e-30)))


def _batches(array, size):
    for start in range(0, len(array), size):
        yield array[start:start + size]


def prune_one_shot(model, calibration_ids, sparsity=0.5, structure="unstructured",
                   method="sparsegpt", batch_size=8, progress=None):
    """Prune `model`'s projection kernels in place, block by block.

    Args:
        model: a keras-llm Functional model (modified: give it a clone).
        calibration_ids: `(N, T)` int token ids (teacher text).
        sparsity: fraction of zeros per kernel (0.5 for 2:4).
        structure: "unstructured" or "2:4".
        method: "sparsegpt" or "wanda".
        batch_size: sequences per forward call.
        progress: optional `fn(block_index, num_blocks, seconds)`.

    Returns:
        `{"method", "sequences", "tokens", "seconds", "relative_error"}`, the
        last the mean over projections of `||(W - W') X|| / ||W X||` on the
        calibration inputs (how much each layer's output moved).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    ids = np.asarray(calibration_ids, np.int32)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"calibration_ids must be (N, T) token ids, got shape {ids.shape}")
    start = time.perf_counter()
    embed = embedding_model(model)
    hidden = np.concatenate([embed(b, training=False).numpy() for b in _batches(ids, batch_size)])
    num_blocks = sum(1 for layer in model.layers if layer.name.endswith("_mlp_residual"))
    errors = []
    for index in range(num_blocks):
        block = block_model(model, index)
        moments = None
        for chunk in _batches(hidden, batch_size):
            inputs = [x.numpy().reshape(-1, x.shape[-1]).astype(np.float32)
                      for x in block(chunk, training=False)[1:]]
            if moments is None:
                moments = [np.zeros((x.shape[1], x.shape[1])) for x in inputs]
            for moment, x in zip(moments, inputs):
                moment += x.T @ x  # float32 per chunk, summed in float64
        count = ids.size
        for group, moment in zip(_INPUT_GROUPS, moments):
            moment /= count
            factor = None
            for kind in group:
                layer = model.get_layer(f"layer_{index}_{kind}")
                kernel = layer.kernel.numpy()
                weight = kernel.T.astype(np.float32)
                if method == "wanda":
                    pruned = np.where(wanda_mask(weight, np.diag(moment), sparsity, structure),
                                      0.0, weight).astype(np.float32)
                else:
                    if factor is None:
                        factor = inverse_cholesky(moment)
                    pruned = sparsegpt(weight, *factor, sparsity, structure)
                errors.append(_relative_output_error(weight, pruned, moment))
                layer.kernel.assign(pruned.T.astype(kernel.dtype))
        hidden = np.concatenate([block(chunk, training=False)[0].numpy()
                                 for chunk in _batches(hidden, batch_size)])
        if progress:
            progress(index, num_blocks, time.perf_counter() - start)
    assert len(errors) == num_blocks * len(PROJECTIONS)
    return {"method": method, "sequences": int(ids.shape[0]), "tokens": int(ids.size),
            "seconds": round(time.perf_counter() - start, 1),
            "relative_error": float(np.mean(errors))}
