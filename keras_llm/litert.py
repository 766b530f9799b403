"""LiteRT (TFLite) decode path: the model's own call converted, run by XNNPACK.

XLA on CPU reads every weight in float32 at each decode step (it hoists a
cast of small weights out of the loop), and its many small kernels cost as
much as the matvecs at batch 1. LiteRT with XNNPACK runs the whole step as
one delegated graph and executes dynamic-range int8 weights with int8
kernels, which is where a CPU decode gets faster than its float32 memory
bound.

`convert` traces the model's forward pass (the same Functional model, under
`ExternalCacheContext`) into one `.tflite` file with signatures:

- `decode_b{B}` for each batch size: tokens `(B, 1)`, per-row position
  `index (B,)` and first real position `key_start (B,)`, and each layer's
  past keys/values `k_{i}`, `v_{i}` `(B, KV, S, D)` as inputs; outputs
  `logits (B, V)` and this step's keys/values `(B, KV, 1, D)`.
- `decode_b{B}_s{L}`: the same over a shorter cache of `L` positions, for
  each of `lengths`. Attention reads (and XNNPACK repacks) every cache slot
  at every step, so early in a sequence a short cache is much cheaper: at
  batch 16 over a 448-slot cache the repacking took more time than the
  int8 weights.
- `prefill`: the same for one row of `T` tokens, with logits for every
  position (for prompts and for teacher-forced scoring).
- `prefill_s{T}`: the same over a cache of `T` positions, for a prompt that
  fits in one call: it has no past, and attending over the full cache's
  (masked) positions was about 40% of SmolLM2's int8 prefill time (92 to
  54 ms for 32 tokens) and a quarter of its float32 one's.
- `verify` and `verify_s{L}` (with `verify_length`): the same for a few
  tokens, at about the cost of one decode step: how speculative decoding
  checks a draft model's guesses (`keras_llm.runtime.speculative`).

The converted graph then gets the query/key/value and gate/up projections
each stacked into one matmul (`keras_llm.litert_fusion`), which the model
keeps apart so that TF-MOT sees one `Dense` per projection.

The past is never copied in or out: `LiteRTRunner` keeps it in the
interpreter's own input buffers and writes each step's new keys/values into
them in place, the only per-step host work besides the tokens.

With `quantization="int8"` the weights are stored as int8 (dynamic-range
quantization) after SmoothQuant-style per-channel smoothing: XNNPACK
quantizes activations per row, so outlier channels of the normalized
activations are divided out (into the RMSNorm scales and the MLP up
projection) and multiplied into the next projection's weights. In float the
smoothed model computes the same function.

Example:
    >>> path = convert(model, "/tmp/model.tflite", quantization="int8")
    >>> runner = LiteRTRunner(path)
    >>> tokens, stats = runner.generate_ids([[1, 2, 3]], max_new_tokens=16)
"""

import contextlib
import os
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_llm.layers import KVCacheContext
from keras_llm.litert_fusion import (_serialize_without, fuse_model, fuse_projections,
                                     split_signatures)
from keras_llm.litert_int4 import BLOCK as INT4_BLOCK, quantize_int4, quantize_int4_model
from keras_llm.litert_weights import WEIGHT_INPUT, bind_weights, quantize_int8
from keras_llm.runtime.litert import LiteRTRunner  # noqa: F401  (re-exported)
from keras_llm.models import config_from_model, find_layer

QUANTIZATIONS = (None, "float16", "int8", "int4")

# Calibration text for the int8 smoothing when the caller has none: ordinary
# English prose written for this project (so never a benchmark's test text).
CALIBRATION_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. "
    "Visitors may borrow up to five books at a time, and most loans last three weeks. "
    "On rainy days the reading room fills quickly, so students often arrive early to find "
    "a seat near the windows. The staff answer questions about local history, help people "
    "search the catalogue, and run a small workshop on writing letters every Thursday. "
    "Last year the building was repaired after a storm damaged part of the roof; the work "
    "took four months, cost more than expected, and was paid for by the town council. "
    "Children's stories, maps of the region, old newspapers and a collection of recipes "
    "from nearby farms are among the things people ask for most.")


class ExternalCacheContext(KVCacheContext):
    """Cache context for a step whose past keys/values are inputs.

    Attention layers see `separate_past` and attend over the past buffers and
    this call's own keys as two blocks (nothing is concatenated or copied);
    the new keys/values are collected in `new` for the caller to output.

    Args:
        past: list of `(keys, values)` per layer, `(B, KV, S, D)`.
        index: int32 `(B,)`, the position of each row's first token of this call.
        key_start: int32 `(B,)`, each row's first real position.
        last_position_only: logits for the last position only.
    """

    separate_past = True

    def __init__(self, past, index, key_start, last_position_only=True):
        super().__init__(past, tf.zeros([], tf.int32), key_start, last_position_only)
        self.row_index = tf.convert_to_tensor(index, tf.int32)
        self.new = [None] * len(past)
        self._biases = None

    def positions(self, length):
        offsets = self.row_index[:, tf.newaxis] + tf.range(length, dtype=tf.int32)
        return offsets - self.key_start[:, tf.newaxis]

    def past(self, layer_index, keys, values):
        self.new[layer_index] = (keys, values)
        return self.caches[layer_index]

    def attention_biases(self, length, past_length):
        """`attention_masks` as additive biases (0 or -1e30), made once per
        call and shared by every layer: an add keeps each layer's attention
        inside one XNNPACK partition, where a select per layer would split
        the graph at every layer."""
        if self._biases is None:
            self._biases = tuple(tf.where(mask, 0.0, -1e30)
                                 for mask in self.attention_masks(length, past_length))
        return self._biases

    def attention_masks(self, length, past_length):
        """`(B, 1, 1, 1, S)` for the past, `(B, 1, 1, T, T)` for this call."""
        slots = tf.range(past_length, dtype=tf.int32)[tf.newaxis, :]
        index = self.row_index[:, tf.newaxis]
        start = self.key_start[:, tf.newaxis]
        past = (slots < index) & (slots >= start)  # (B, S)
        steps = tf.range(length, dtype=tf.int32)
        causal = steps[tf.newaxis, :] <= steps[:, tf.newaxis]  # (T query, T key)
        started = (index + steps[tf.newaxis, :]) >= start  # (B, T key)
        new = causal[tf.newaxis] & started[:, tf.newaxis, :]  # (B, T, T)
        return (past[:, tf.newaxis, tf.newaxis, tf.newaxis, :],
                new[:, tf.newaxis, tf.newaxis, :, :])


def calibration_ids(tokenizer, length=128):
    """`(1, length)` token ids of `CALIBRATION_TEXT` for `convert`."""
    ids = tokenizer.encode(CALIBRATION_TEXT)[:length]
    return np.asarray([ids], np.int32)


# ----- smoothing ---------------------------------------------------------------


def _copy_model(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _calibration_ids(config, calibration_ids):
    if calibration_ids is not None:
        ids = np.asarray(calibration_ids, np.int32)
        return ids if ids.ndim == 2 else ids[np.newaxis]
    rng = np.random.default_rng(0)
    return rng.integers(0, config.vocabulary_size, size=(2, 64), dtype=np.int32)


def smooth(model, calibration_ids=None, alpha=0.5, block=None):
    """A copy of `model` with SmoothQuant per-channel scales folded in.

    For each layer, the inputs of the query/key/value and gate/up projections
    are divided per channel by `s = a**alpha / w**(1 - alpha)` (a: the
    channel's largest activation on the calibration tokens, w: its largest
    weight in the projections that read it), folded into the RMSNorm scale,
    and the projections' weight rows are multiplied by `s`. The down
    projection's input is smoothed the same way through the up projection's
    output columns (`silu(gate) * up` is linear in `up`).

    Args:
        model: a keras-llm Functional model (float32).
        calibration_ids: `(B, T)` token ids (natural text is best); a fixed
            random batch if None.
        alpha: migration strength in [0, 1]; 0 leaves the model unchanged.
        block: one scale per `block` consecutive input channels (the largest
            activation and weight of the block decide it), so that weights
            stored by blocks of `block` inputs (int4: a Q4_1 file's) stay
            on their grid: every block of a row is scaled by one factor, and
            every weight row the division lands in (the up projection's) as
            a whole.
    """
    smoothed = _copy_model(model)
    for readers, scale, norm_name, up_name in smoothing_factors(model, calibration_ids, alpha,
                                                                block):
        for reader in readers:
            kernel = find_layer(smoothed, reader).kernel
            kernel.assign(kernel.numpy() * scale[:, np.newaxis])
        if norm_name is not None:  # the norm's factor `offset + scale` becomes `/ s`
            norm = find_layer(smoothed, norm_name)
            offset = norm.weight_offset
            norm.scale.assign((norm.scale.numpy() + offset) / scale - offset)
        else:
            up = find_layer(smoothed, up_name).kernel
            up.assign(up.numpy() / scale[np.newaxis, :])
    return smoothed


def smoothing_factors(model, calibration_ids=None, alpha=0.5, block=None):
    """What `smooth` changes, without copying the model: a list of
    `(reader layer names, per-channel scale s, norm layer name or None, up
    layer name or None)`; the readers' kernel rows are multiplied by `s`, and
    the norm's factor (or the up projection's output columns) divided by it."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    config = config_from_model(model)
    ids = _calibration_ids(config, calibration_ids)
    probes = []
    for i in range(config.num_layers):
        probes += [find_layer(model, f"layer_{i}_attention_norm").output,
                   find_layer(model, f"layer_{i}_mlp_norm").output,
                   find_layer(model, f"layer_{i}_mlp_down").input]
    activations = keras.Model(model.inputs, probes)(tf.constant(ids), training=False)

    def channel_max(tensor):
        return np.maximum(np.abs(np.asarray(tensor)).reshape(-1, tensor.shape[-1]).max(0), 1e-5)

    factors = []
    for i in range(config.num_layers):
        attention_in, mlp_in, down_in = activations[3 * i:3 * i + 3]
        groups = [(attention_in, f"layer_{i}_attention_norm", None, ("query", "key", "value")),
                  (mlp_in, f"layer_{i}_mlp_norm", None, ("mlp_gate", "mlp_up")),
                  (down_in, None, f"layer_{i}_mlp_up", ("mlp_down",))]
        for acts, norm_name, up_name, readers in groups:
            readers = [f"layer_{i}_{r}" for r in readers]
            kernels = [find_layer(model, r).kernel for r in readers]
            weight_max = np.maximum(
                np.max([np.abs(k.numpy()).max(1) for k in kernels], axis=0), 1e-5)
            activation_max = channel_max(acts)
            if block and len(activation_max) % block == 0:  # else int8 (litert_int4)
                activation_max, weight_max = (
                    np.repeat(v.reshape(-1, block).max(1), block)
                    for v in (activation_max, weight_max))
            scale = (activation_max ** alpha / weight_max ** (1.0 - alpha)).astype(np.float32)
            factors.append((readers, scale, norm_name, up_name))
    return factors


def _smooth_arrays(model, arrays, factors):
    """`smooth`'s changes made to the weight arrays of a conversion (see
    `_weight_arrays`: kernels transposed), in place."""
    index = {id(w): j for j, w in enumerate(model.weights)}
    for readers, scale, norm_name, up_name in factors:
        for reader in readers:  # (out, in): a kernel's rows are these columns
            arrays[index[id(find_layer(model, reader).kernel)]] *= scale[np.newaxis, :]
        if norm_name is not None:  # not in place: the array may be the variable's memory
            norm = find_layer(model, norm_name)
            j = index[id(norm.scale)]
            arrays[j] = (arrays[j] + norm.weight_offset) / scale - norm.weight_offset
        else:
            arrays[index[id(find_layer(model, up_name).kernel)]] /= scale[:, np.newaxis]


# ----- conversion --------------------------------------------------------------


def _step_functions(model, max_length, batch_sizes, prefill_length, lengths=(), verify_length=0,
                    weights=None, config=None, forward=None):
    """The tf.functions that become the .tflite signatures, by name, and the
    object the converter saves them with.

    `config` (default: the keras-llm model's) gives `num_layers`,
    `num_key_value_heads` and `head_dim` of the caches; `forward(tokens,
    context)` (default: `model(tokens)` with the `ExternalCacheContext`
    active) runs the model over them (`runtime.mha_cache` passes its own
    for a user's `MultiHeadAttention` model).

    With `weights` (from `_weight_inputs`) every function takes the model's
    weights as inputs `w_{j}` after the caches and the object tracks
    nothing; otherwise it tracks the model's variables and nothing else (a
    tracked Keras model has every layer's call traced into the converter's
    intermediate SavedModel, and tracked tf.functions are traced again for
    it; together half of such a conversion's time).
    """
    c = config_from_model(model) if config is None else config
    holder = tf.Module(name="litert_steps")
    if weights is None:
        holder.weights = list(model.weights)
    functions = {}

    def add(name, batch, length, cache_length):
        functions[name] = _step_function(model, c, batch, length, cache_length, name, weights,
                                         forward)

    for batch in batch_sizes:
        for cache_length in (*lengths, max_length):
            add(f"decode_b{batch}" + (f"_s{cache_length}" if cache_length < max_length else ""),
                batch, 1, cache_length)
    add("prefill", 1, prefill_length, max_length)
    if prefill_length < max_length:  # a prompt's only chunk: no past to attend over
        add(f"prefill_s{prefill_length}", 1, prefill_length, prefill_length)
    for cache_length in (*lengths, max_length) if verify_length else ():
        add("verify" + (f"_s{cache_length}" if cache_length < max_length else ""),
            1, verify_length, cache_length)
    return holder, functions


# Weight attributes of the layers a keras-llm model is built from (Dense,
# TokenEmbedding, RMSNorm) and whether the converted graph reads them
# transposed (FULLY_CONNECTED's weights are `(out, in)`).
_WEIGHT_ATTRIBUTES = {"kernel": True, "bias": False, "embeddings": False, "scale": False}


def _weight_inputs(model):
    """`[(layer, attribute, index in model.weights, transposed)]` covering
    every weight of `model`, or None if some weight is not a float32
    variable held in one of `_WEIGHT_ATTRIBUTES` (the converter then takes
    the weights as constants)."""
    variables = {id(v): j for j, v in enumerate(model.weights)}
    found = []
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        for attribute, transposed in _WEIGHT_ATTRIBUTES.items():
            value = layer.__dict__.get(attribute)
            if isinstance(value, tf.Variable) and id(value) in variables:
                found.append((layer, attribute, variables[id(value)], transposed))
    covered = {j for _, _, j, _ in found}
    if covered != set(range(len(model.weights))) or len(found) != len(covered) or \
            any(v.dtype != tf.float32 for v in model.weights):
        return None
    return found


@contextlib.contextmanager
def _weights_replaced(weights, tensors):
    """Layers read `tensors` (by weight index) in place of their variables."""
    saved = [(layer, attribute, layer.__dict__[attribute]) for layer, attribute, _, _ in weights]
    try:
        for layer, attribute, j, transposed in weights:
            object.__setattr__(layer, attribute,
                               tf.transpose(tensors[j]) if transposed else tensors[j])
        yield
    finally:
        for layer, attribute, value in saved:
            object.__setattr__(layer, attribute, value)


def _weight_arrays(model, weights):
    """The weights' values as the converted graph reads them (see
    `_weight_inputs`), and their names."""
    arrays, names = [None] * len(model.weights), [None] * len(model.weights)
    for _, _, j, transposed in weights:
        value = model.weights[j].numpy()
        arrays[j] = np.array(value.T, order="C") if transposed else value  # kernels: copies
        names[j] = f"{model.name}/{model.weights[j].name.split(':')[0]}"
    return arrays, names


def _step_function(model, c, batch, length, max_length, name, weights=None, forward=None):
    last_position_only = not name.startswith(("prefill", "verify"))
    cache = tf.TensorSpec([batch, c.num_key_value_heads, max_length, c.head_dim], tf.float32)
    specs = [tf.TensorSpec([batch, length], tf.int32, name="tokens"),
             tf.TensorSpec([batch], tf.int32, name="index"),
             tf.TensorSpec([batch], tf.int32, name="key_start")]
    for i in range(c.num_layers):
        specs += [tf.TensorSpec(cache.shape, tf.float32, name=f"k_{i}"),
                  tf.TensorSpec(cache.shape, tf.float32, name=f"v_{i}")]
    past_end = len(specs)
    for _, _, j, transposed in sorted(weights or (), key=lambda w: w[2]):
        shape = model.weights[j].shape
        specs.append(tf.TensorSpec(shape[::-1] if transposed else shape, tf.float32,
                                   name=f"{WEIGHT_INPUT}{j}"))

    def step(tokens, index, key_start, *inputs):
        past = inputs[:past_end - 3]
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(c.num_layers)]
        context = ExternalCacheContext(pairs, index, key_start, last_position_only)
        replaced = (_weights_replaced(weights, inputs[past_end - 3:]) if weights
                    else contextlib.nullcontext())
        with replaced:
            if forward is not None:
                logits = forward(tokens, context)
            else:
                with context.active():
                    logits = model(tokens, training=False)
        logits = logits[:, -1, :] if last_position_only else logits
        outputs = {"logits": logits, "greedy": tf.argmax(logits, axis=-1, output_type=tf.int32)}
        for i, (keys, values) in enumerate(context.new):
            outputs[f"new_k_{i}"] = keys
            outputs[f"new_v_{i}"] = values
        return outputs

    # The converter names each signature after its function.
    step.__name__ = name
    return tf.function(step, input_signature=specs, autograph=False)


def default_lengths(max_length):
    """Shorter decode caches worth compiling below `max_length`: 128, 256,
    512, ..., each at most 3/4 of `max_length` (none for short files)."""
    lengths, length = [], 128
    while 4 * length <= 3 * max_length:
        lengths.append(length)
        length *= 2
    return tuple(lengths)


def convert(model, path, quantization=None, smooth_alpha=0.5, max_length=512,
            batch_sizes=(1, 4, 16), prefill_length=64, calibration_ids=None, lengths=(),
            fuse=True, split=False, progress=None, verify_length=0, freeze_weights=False):
    """Convert `model` to a LiteRT file at `path` (written atomically).

    Args:
        model: a keras-llm Functional model.
        path: the `.tflite` file to write.
        quantization: None (float32), "float16" (16-bit weights), "int8"
            (dynamic-range int8 weights, smoothed; see `smooth`) or "int4"
            (4-bit weights by blocks of 32, a Q4_1 file's own codes; see
            `keras_llm.litert_int4`).
        smooth_alpha: SmoothQuant strength for "int8" (0 turns it off).
        max_length: cache positions per sequence (prompt plus new tokens).
        batch_sizes: the decode batch sizes to compile.
        prefill_length: tokens per prefill call (longer prompts take several).
        calibration_ids: `(B, T)` token ids for smoothing.
        lengths: shorter cache lengths to compile decode steps for as well
            (`decode_b{B}_s{L}`); `default_lengths(max_length)` is a good set
            for serving. Each adds a signature per batch size (conversion
            time and cache memory), none adds weights.
        fuse: stack the projections that read the same activations (query,
            key and value; gate and up) into one matmul each
            (`keras_llm.litert_fusion`); the results are the same.
        split: write one file per signature instead of one file: the
            prefill in `path`, each decode step `X` in
            `<path without .tflite>.X.tflite` (what the runtime uses: each
            file's weights are prepared only when it is used).
        verify_length: tokens per `verify` call (0: no `verify` signature);
            a draft of `verify_length - 1` tokens is checked in one call.
        freeze_weights: let TensorFlow's converter take the weights as
            constants of the graph (and quantize them itself), as before
            `keras_llm.litert_weights`: several times the time and memory.
            Always so for "float16" and for models whose weights are not
            all float32 attributes of keras-llm's layers.
        progress: called with the fraction of the work each stage did
            (they add up to 1): tracing, TensorFlow Lite's converter, the
            fusion, then each file written. For SmolLM2 on 2 cores the
            converter is about half of it.

    Returns:
        `path`, or with `split` the list of files written (`path` first).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    config = config_from_model(model)
    if not 0 < max_length <= config.context_length:
        raise ValueError(f"max_length must be in [1, {config.context_length}]")
    if prefill_length > max_length or verify_length > max_length:
        raise ValueError("prefill_length and verify_length cannot exceed max_length")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError("batch_sizes must be positive integers")
    lengths = sorted({int(n) for n in lengths})
    if lengths and not 0 < lengths[0] <= lengths[-1] < max_length:
        raise ValueError(f"lengths must be in [1, max_length={max_length}), got {lengths}")
    done = progress or (lambda fraction: None)
    weights = None if freeze_weights or quantization == "float16" else _weight_inputs(model)
    factors = None
    if quantization in ("int8", "int4") and smooth_alpha:  # int4 keeps its blocks' grids
        block = INT4_BLOCK if quantization == "int4" else None
        if weights:  # applied to the bound weights: no copy of the model
            factors = smoothing_factors(model, calibration_ids, smooth_alpha, block)
        else:
            model = smooth(model, calibration_ids, smooth_alpha, block=block)
    holder, steps = _step_functions(model, max_length, batch_sizes, prefill_length, lengths,
                                    verify_length, weights)
    functions = [f.get_concrete_function() for f in steps.values()]
    if weights and any(f.captured_inputs for f in functions):
        raise RuntimeError("the step functions still read variables with the weights as inputs")
    done(0.1)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "int8" and not weights:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    flatbuffer = converter.convert()
    done(0.3 if weights else 0.5)
    if weights:
        arrays, names = _weight_arrays(model, weights)
        if factors:
            _smooth_arrays(model, arrays, factors)
        tflite = bind_weights(flatbuffer, arrays, names)
        del arrays, flatbuffer
        done(0.2)
        # int8 before fusing (each projection's own size decides, as in the
        # converter), int4 after (the stacked weights' blocks are the same)
        replaced = quantize_int8(tflite) if quantization == "int8" else set()
        if fuse:
            replaced |= fuse_model(tflite) or set()
        if quantization == "int4":
            replaced |= quantize_int4_model(tflite) or set()
        flatbuffer = _serialize_without(tflite, replaced)
        del tflite
    else:
        if fuse:
            flatbuffer = fuse_projections(flatbuffer)
        if quantization == "int4":
            flatbuffer = quantize_int4(flatbuffer)
    done(0.1)
    if not split:
        _write(path, flatbuffer)
        done(0.3)
        return path
    # One file per signature, the prefills' first: an interpreter prepares
    # (packs the weights of) every signature of its file at once, so a
    # process pays only for the files it uses (a short answer: one).
    prefills = [n for n in steps if n.startswith("prefill")]
    groups = [prefills] + [[n] for n in steps if n not in prefills]
    stem = path[:-len(".tflite")] if path.endswith(".tflite") else path
    paths = [path] + [f"{stem}.{group[0]}.tflite" for group in groups[1:]]
    for target, data in zip(paths, split_signatures(flatbuffer, groups)):
        _write(target, data)
        done(0.3 / len(paths))
    return paths


def convert_cached(model, path, config, forward, max_length, batch_sizes=(1, 4, 16),
                   prefill_length=64, lengths=(), verify_length=0):
    """Convert a user's causal LM whose attention reads an
    `ExternalCacheContext` (see `runtime.mha_cache.convert_litert`) to a
    LiteRT file at `path` (written atomically) with the signatures, inputs
    and outputs of `convert`'s, which `runtime.litert.LiteRTBackend` runs.
    The weights are the graph's constants (float32).

    Args:
        config: `num_layers`, `num_key_value_heads` (the attention's heads)
            and `head_dim` (its key and value size) of the caches.
        forward: `forward(tokens, context) -> logits (B, T, V)`, the model
            run with its attention over `context`.
        max_length, batch_sizes, prefill_length, lengths, verify_length: as
            for `convert`.
    """
    holder, steps = _step_functions(model, max_length, sorted({int(b) for b in batch_sizes}),
                                    prefill_length, sorted({int(n) for n in lengths}),
                                    verify_length, config=config, forward=forward)
    return _convert_builtins([f.get_concrete_function() for f in steps.values()], holder, path)


def convert_recompute(functions, path, row_counts):
    """Convert the forward pass of a user's causal LM (a
    `runtime.recompute.RecomputeFunctions`) to a LiteRT file at `path`
    (written atomically), run by `runtime.litert.LiteRTRecompute`.

    One signature per row count, `rows_{n}`: `token_ids (n, T)` int32 with
    `T` dynamic (the runtime resizes it to each length bucket), `last (n,)`
    -> `greedy (n,)`, `logits (n, V)` at each row's `last` position. A fixed
    batch dimension matters: with a dynamic one the same model ran about
    40% slower under XNNPACK. The signatures share one set of weights.

    Raises:
        Exception: whatever TensorFlow Lite's converter raises for a model
            it cannot convert to built-in ops (the caller falls back).
    """
    from keras_llm.runtime.recompute import last_logits  # pylint: disable=import-outside-toplevel
    holder = tf.Module(name="litert_recompute")
    holder.weights = list(functions.model.weights)  # the variables, not the model's layers
    steps = []
    for rows in sorted({int(n) for n in row_counts}):
        def step(token_ids, last):
            greedy, logits = last_logits(functions.model, functions.plan,
                                         token_ids, last, functions.any_length)
            return {"greedy": greedy, "logits": logits}

        step.__name__ = f"rows_{rows}"  # the signature's name
        steps.append(tf.function(step, autograph=False, input_signature=[
            tf.TensorSpec([rows, None], tf.int32, name="token_ids"),
            tf.TensorSpec([rows], tf.int32, name="last")]).get_concrete_function())
    return _convert_builtins(steps, holder, path)


def _convert_builtins(functions, holder, path):
    """Convert concrete `functions` (saved with `holder`) to TFLite's
    built-in ops, float32, into `path` (atomically); returns `path`."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    _write(path, converter.convert())
    return path


def _write(path, data):
    """Write `data` to `path` atomically (a staging file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(suffix=".tflite.partial", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
