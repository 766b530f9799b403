"""Post-training int8 weight quantization of the projection `Dense` kernels.

Per-output-channel symmetric int8: for a kernel `W (in, out)`,
`scale[o] = max_i |W[i, o]| / 127` and `q = round(W / scale)` in [-127, 127],
so `|W - q * scale| <= scale / 2` element-wise. The token embedding (also the
tied output head) and the norms stay float.

Two ways to use it:
- `quantize_weights` / `dequantized_model`: the int8 kernels and scales, and a
  float model whose kernels are `q * scale`, to measure quality (this is the
  model an int8 runtime would compute, up to activation rounding);
- `quantize_model`: a keras-llm model whose projections are `QuantizedDense`
  layers holding the int8 kernel (an int8 variable) and the float32 scales,
  so `model.save("x.keras")` stores int8, and `tf.keras.models.load_model`
  reads it back (after `import keras_llm.optimize`, which registers the layer).

Example:
    >>> q_model = quantize_model(model)
    >>> q_model.save("model-int8.keras")
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_llm.layers.quantized_dense import QuantizedDense
from keras_llm.optimize._common import clone_with, projection_layers

INT8_MAX = 127


def quantize_kernel(kernel):
    """Per-output-channel symmetric int8 quantization of a `(in, out)` kernel.

    Returns:
        `(q, scale)`: int8 `(in, out)` and float32 `(out,)`; an all-zero
        column gets scale 1 (and q 0), so nothing divides by zero.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 2:
        raise ValueError(f"expected a rank-2 kernel, got shape {kernel.shape}")
    peak = np.max(np.abs(kernel), axis=0)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.round(kernel / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def dequantize(q, scale):
    """`q * scale` as float32."""
    return np.asarray(q, np.float32) * np.asarray(scale, np.float32)


def quantize_weights(model, kinds=None):
    """`{layer name: (int8 kernel, float32 scales)}` for the projections."""
    return {layer.name: quantize_kernel(layer.kernel.numpy())
            for layer in projection_layers(model, kinds)}


def dequantized_model(model, quantized=None, kinds=None):
    """A float clone of `model` whose projection kernels are `q * scale`.

    Args:
        model: a keras-llm model (not modified).
        quantized: output of `quantize_weights` (computed when None).
    """
    quantized = quantize_weights(model, kinds) if quantized is None else quantized
    clone = clone_with(model, lambda fresh, original: None)
    for layer in projection_layers(clone):
        if layer.name in quantized:
            layer.kernel.assign(dequantize(*quantized[layer.name]))
    return clone


def quantize_model(model, kinds=None):
    """A keras-llm model with its projections as int8 `QuantizedDense` layers.

    Layer names are unchanged, so `config_from_model`, `find_layer` and the
    `Generator` work on it. Returns an uncompiled model; `model` is not
    modified.
    """
    biased = [layer.name for layer in projection_layers(model, kinds) if layer.use_bias]
    if biased:  # QuantizedDense has no bias: refuse rather than drop it
        raise ValueError(f"quantize_model supports bias-free projections only; "
                         f"{biased[:3]} have a bias (attention_bias models such as Qwen2)")
    quantized = quantize_weights(model, kinds)

    def replace(fresh, original):
        if original.name not in quantized:
            return None
        return QuantizedDense(original.units, dtype=original.dtype_policy,
                              name=original.name)

    clone = clone_with(model, replace)
    for layer in clone.layers:
        if isinstance(layer, QuantizedDense):
            q, scale = quantized[layer.name]
            layer.kernel.assign(q)
            layer.scale.assign(scale)
    return clone


# ----- quantization-aware training (TF-MOT) ---------------------------------
#
# `tfmot.quantization.keras.quantize_model(model)` refuses keras-llm models:
# it puts a `QuantizeLayer` after the int32 `token_ids` input and
# FakeQuantWithMinMaxVars fails ("Input 'inputs' of 'FakeQuantWithMinMaxVars'
# Op has type int32 that does not match expected type of float32"); the same
# happens when `TokenEmbedding` is annotated. Annotating only the projection
# `Dense` layers with the weight-only per-channel config below works, and its
# forward pass equals `dequantized_model` exactly (once the quantizer ranges
# have been set by one training-mode call).

def _tfmot_quantization():
    import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel

    return tfmot.quantization.keras


def _weight_only_config_class():
    qk = _tfmot_quantization()

    class WeightOnlyInt8Config(qk.QuantizeConfig):
        """Per-output-channel symmetric int8 fake quantization of the kernel
        (the scheme of `quantize_kernel`), activations left in float."""

        def get_weights_and_quantizers(self, layer):
            return [(layer.kernel, qk.quantizers.LastValueQuantizer(
                num_bits=8, per_axis=True, symmetric=True, narrow_range=True))]

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            layer.kernel = quantize_weights[0]

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {}

    return WeightOnlyInt8Config


def qat_model(model, kinds=None):
    """A TF-MOT QAT clone: projections in `QuantizeWrapperV2` with
    per-channel int8 weight fake quantization, everything else as is.

    The weight quantizers' ranges start at [-6, 6]; one training-mode call
    here sets them from the kernels, so inference matches
    `dequantized_model(model)` from the start.
    """
    qk = _tfmot_quantization()
    config_class = _weight_only_config_class()
    targets = {layer.name for layer in projection_layers(model, kinds)}

    def replace(fresh, original):
        if original.name in targets:
            return qk.quantize_annotate_layer(fresh, config_class())
        return None

    annotated = clone_with(model, replace)
    with qk.quantize_scope({"WeightOnlyInt8Config": config_class}):
        wrapped = qk.quantize_apply(annotated)
    wrapped(tf.zeros([1, 2], tf.int32), training=True)
    return wrapped


def float_model_from_qat(wrapped, like):
    """A plain clone of `like` holding the (float) weights of QAT model `wrapped`.

    Inside a `QuantizeWrapperV2` the Dense no longer lists its kernel
    (`get_weights()` is empty: `set_quantize_weights` replaced the attribute),
    so the kernel is taken from the wrapper's variables, `<name>/kernel:0`.
    """
    from keras_llm.models.llama import unwrap  # pylint: disable=import-outside-toplevel

    plain = clone_with(like, lambda fresh, original: None)
    trained = {unwrap(layer).name: layer for layer in wrapped.layers}
    for layer in plain.layers:
        source = trained.get(layer.name)
        if not layer.weights or source is None:
            continue
        if source is unwrap(source):
            layer.set_weights(source.get_weights())
        else:
            kernel = [v for v in source.weights if v.name == f"{layer.name}/kernel:0"]
            if len(kernel) != 1:
                raise RuntimeError(f"no kernel variable in the QAT wrapper of {layer.name}")
            layer.kernel.assign(kernel[0])
    return plain


class KeepZeros(keras.callbacks.Callback):
    """Prune-preserving QAT: after every optimizer step, weights that were
    zero when training started are set back to zero.

    TF-MOT's `Default8BitPrunePreserveQuantizeScheme` does the same inside its
    own quantizers; keras-llm's QAT uses its own weight-only `QuantizeConfig`
    (the default scheme cannot take an int32 `token_ids` input), so the masks
    are kept here, on the float kernels inside the `QuantizeWrapperV2`s.
    Symmetric int8 maps 0 to 0, so the int8 model keeps the same zeros.
    """

    def __init__(self, kernels):
        super().__init__()
        self.kernels = list(kernels)
        self.masks = [tf.cast(tf.not_equal(k, 0), k.dtype) for k in self.kernels]

    def on_train_batch_end(self, batch, logs=None):
        for kernel, mask in zip(self.kernels, self.masks):
            kernel.assign(kernel * mask)


def qat_kernels(wrapped, kinds=None):
    """The float kernel variables inside the QAT wrappers of the projections."""
    from keras_llm.models.llama import unwrap  # pylint: disable=import-outside-toplevel
    from keras_llm.optimize._common import _PROJECTION_RE  # pylint: disable=import-outside-toplevel

    kernels = []
    for layer in wrapped.layers:
        name = unwrap(layer).name
        match = _PROJECTION_RE.match(name)
        if layer is unwrap(layer) or not match or (kinds and match.group(2) not in kinds):
            continue
        kernels += [v for v in layer.weights if v.name == f"{name}/kernel:0"]
    return kernels


def quantization_aware_fine_tune(model, batches, steps, learning_rate=1e-4, kinds=None,
                                 verbose=0, preserve_zeros=False, callbacks=(),
                                 backup_dir=None, backup_every=50):
    """Short QAT (next-token cross-entropy) and int8 export.

    Args:
        preserve_zeros: keep the zeros of a pruned `model` through training
            (`KeepZeros`): prune-preserving quantization.
        callbacks: extra Keras callbacks (progress, ...).
        backup_dir, backup_every: `BackupAndRestore` of the training
            (`keras_llm.optimize.training.fit_steps`).

    Returns:
        `(int8 model, qat model)`: the first is `quantize_model` of the
        trained float weights (what is saved), the second the TF-MOT model.
    """
    from keras_llm.optimize.training import fit_steps  # pylint: disable=import-outside-toplevel

    wrapped = qat_model(model, kinds)
    wrapped.compile(optimizer=keras.optimizers.Adam(learning_rate),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    extra = [KeepZeros(qat_kernels(wrapped, kinds))] if preserve_zeros else []
    fit_steps(wrapped, batches, steps, extra + list(callbacks), verbose, backup_dir,
              backup_every)
    # The weight quantizers' ranges were read before the last optimizer
    # update; one training-mode call refreshes them so `wrapped` computes
    # what the int8 model does.
    wrapped(tf.zeros([1, 2], tf.int32), training=True)
    return quantize_model(float_model_from_qat(wrapped, model), kinds), wrapped
