"""4-bit weights for LiteRT files, executed by XNNPACK's 4-bit kernels.

`quantize_int4` rewrites a converted float32 flatbuffer. Each projection's
weight matrix `W` (FULLY_CONNECTED, `(out, in)`) is cut into blocks of 32
inputs per output row and each block is stored the way a Q4_1 GGUF block
is: a scale `d`, a minimum `m` and 4-bit codes `q` in 0..15, with
`w = d * q + m` (a Q4_0 block, `d * (q - 8)`, is one too). XNNPACK's blockwise 4-bit kernels take symmetric codes
only (`w = d * c`, `c` in -8..7), so the block is split in two exact parts:

    W x = sum_b d_b (q - 8) . x_b  +  sum_b (m_b + 8 d_b) * sum(x_b)

The first sum is one FULLY_CONNECTED with blockwise INT4 weights (codes
`q - 8`, XNNPACK's qd8-f32-qb4w kernels: activations quantized to 8 bits per
row on the fly, like the int8 path); the second is two small ones, a block
sum of the input (`in / 32` outputs, float32) and the block offsets `(out,
in / 32)`, int8 per output row, added to the first. For weights that came
from a Q4_0/Q4_1 GGUF (SmolLM2's shipped file is Q4_1) the codes are the
file's own, so nothing is rounded a second time: what differs from the
float32 model is the scale rounded to bfloat16 (the format's scale type, at
most 1/256 of a scale), the offsets' 8 bits and the activations' dynamic
8-bit quantization (the largest part; `keras_llm.litert.smooth(block=32)`
eases it without moving a weight off its grid). For other weights it is
min/max 4-bit quantization per block of 32.

Measured on SmolLM2 (README, "4-bit weights"): the offsets cost about a
quarter of the decode speed that plain symmetric 4-bit codes would have, and
symmetric codes re-rounded from a Q4_1 file's weights gave a mean KL of 0.5
against float32 where these give 0.02.

The output projection (the matrix with as many rows as the embedding table:
SmolLM2's is Q8_0 in its GGUF) is stored as per-channel int8 instead, as the
int8 path stores it: the weights it came from have 8 bits.

Example:
    >>> flatbuffer = quantize_int4(fuse_projections(converter.convert()))
"""

import collections

import ml_dtypes
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from keras_llm.litert_fusion import (_add_buffer, _add_tensor, _builtin, _constant,
                                     _drop_tensors, _is_constant, _opcode_index, _operator,
                                     _serialize_without)

BLOCK = 32


def block_codes(weights, block=BLOCK):
    """Q4_1-style codes of `weights` `(out, in)` by blocks of `block` inputs.

    Returns `(codes, scale, minimum)`: `codes` uint8 in 0..15 `(out, in)`,
    `scale` and `minimum` float32 `(out, in / block)`, with
    `scale * codes + minimum` the quantized weights: the weights themselves
    when a block already lies on a grid of at most 16 levels, as a Q4_1 or
    Q4_0 file's blocks do (a Q4_0 block need not use its extreme levels, so
    the grid's step is found from the values, not only from their range),
    else min/max 4-bit quantization of the block.
    """
    weights = np.asarray(weights, np.float32)
    rows, columns = weights.shape
    if columns % block:
        raise ValueError(f"{columns} inputs are not a multiple of the block size {block}")
    blocks = weights.reshape(rows, columns // block, block)
    minimum = blocks.min(axis=-1)
    span = blocks.max(axis=-1) - minimum
    scale = span / 15.0
    # A grid already there: the smallest gap between distinct values is its
    # step when the span is a whole number (<= 15) of such steps.
    ordered = np.sort(blocks, axis=-1)
    gaps = np.diff(ordered, axis=-1)
    tolerance = 1e-5 * np.maximum(np.abs(ordered).max(axis=-1), 1e-30)
    gaps = np.where(gaps > tolerance[..., None], gaps, np.inf)
    step = gaps.min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = span / step
    on_grid = np.isfinite(step) & (np.abs(levels - np.rint(levels)) < 1e-3) & (levels < 15.5)
    grid = span / np.where(on_grid, np.rint(levels), 1.0)
    safe = np.where(grid > 0, grid, 1.0)
    codes = np.clip(np.rint((blocks - minimum[..., None]) / safe[..., None]), 0, 15)
    error = np.abs(codes * grid[..., None] + minimum[..., None] - blocks).max(axis=-1)
    on_grid &= error <= 4 * tolerance  # every value on it, not just the closest two
    scale = np.where(on_grid, grid, scale)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint((blocks - minimum[..., None]) / safe[..., None]), 0, 15)
    return codes.astype(np.uint8).reshape(rows, columns), scale.astype(np.float32), minimum


def storage_scale(scale):
    """`scale` as the file stores it: rounded to bfloat16 (XNNPACK's scale
    type), kept in a float16 tensor (the schema's)."""
    return np.asarray(scale, np.float32).astype(ml_dtypes.bfloat16).astype(np.float16)


def pack_int4(values):
    """Signed 4-bit values (-8..7), two per byte, the first in the low nibble."""
    flat = (np.asarray(values, np.int16).reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(data, count):
    """The inverse of `pack_int4`: `count` signed values from packed bytes."""
    data = np.asarray(data, np.uint8)
    pairs = np.stack([data & 0xF, data >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
    return np.where(pairs > 7, pairs - 16, pairs).astype(np.int8)


def dequantize_int4(codes, scale):
    """Weights of a blockwise INT4 tensor: `codes` `(out, in)` signed, `scale`
    `(out, in / block)`."""
    rows, columns = codes.shape
    blocks = scale.shape[1]
    return (codes.reshape(rows, blocks, -1).astype(np.float32)
            * np.asarray(scale, np.float32)[..., None]).reshape(rows, columns)


def _blockwise(subgraph, name, buffers, shape):
    """An INT4 weight tensor with blockwise scales (zero points implied 0)
    over the (codes, scales) buffers."""
    codes, scales = buffers
    rows, columns = shape
    scale_tensor = _add_tensor(subgraph, name + "/scales", [rows, columns // BLOCK],
                               schema.TensorType.FLOAT16, scales)
    details = schema.BlockwiseQuantizationT()
    details.scales = scale_tensor
    details.zeroPoints = -1
    details.blockSize = BLOCK
    quantization = schema.QuantizationParametersT()
    quantization.detailsType = schema.QuantizationDetails.BlockwiseQuantization
    quantization.details = details
    quantization.quantizedDimension = 0
    return _add_tensor(subgraph, name, [rows, columns], schema.TensorType.INT4, codes,
                       quantization)


def per_channel_int8(weights):
    """Symmetric per-output-row int8 values and scales of `weights` `(out, in)`."""
    weights = np.asarray(weights, np.float32)
    scale = np.abs(weights).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(weights / scale[:, None]), -127, 127).astype(np.int8), scale


def _head_rows(model):
    """Rows of the embedding table(s) GATHER reads: the output projection of a
    model with tied embeddings has as many."""
    gather = {i for i, code in enumerate(model.operatorCodes)
              if _builtin(code) == schema.BuiltinOperator.GATHER}
    rows = set()
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if op.opcodeIndex in gather:
                table = subgraph.tensors[op.inputs[0]]
                if len(table.shape) == 2 and _is_constant(model, table):
                    rows.add(int(table.shape[0]))
    return rows


class _Buffers:
    """The new weight buffers, made once per source buffer: the signatures
    of one file share their weights, and so do their replacements."""

    def __init__(self, model):
        self.model = model
        self.made = {}

    def get(self, key, make):
        if key not in self.made:
            self.made[key] = _add_buffer(self.model, make())
        return self.made[key]

    def int4(self, tensor):
        """`(codes buffer, scales buffer, offsets buffer, offsets' per-row
        scales)` replacing `tensor`'s weights."""
        key = ("int4", tensor.buffer)
        if key not in self.made:
            codes, scale, minimum = block_codes(_constant(self.model, tensor))
            offsets, offset_scale = per_channel_int8(minimum + 8.0 * scale)
            self.made[key] = (_add_buffer(self.model, pack_int4(codes.astype(np.int8) - 8)),
                              _add_buffer(self.model, storage_scale(scale)),
                              _add_buffer(self.model, offsets), offset_scale)
        return self.made[key]


def quantize_int4(flatbuffer):
    """Return `flatbuffer` (a float32 .tflite model's bytes) with 4-bit
    projection weights and an int8 output projection (see the module
    docstring). FULLY_CONNECTED ops whose weights are not float32 constants
    or that apply an activation are left as they are; weights whose inputs
    are not a multiple of 32 become int8."""
    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    replaced = quantize_int4_model(model)
    return flatbuffer if replaced is None else _serialize_without(model, replaced)


def quantize_int4_model(model):
    """`quantize_int4` on a parsed model (a `schema.ModelT`), in place.
    Returns the float32 buffers it replaced, or None if the model has no
    FULLY_CONNECTED op."""
    fully_connected = {i for i, code in enumerate(model.operatorCodes)
                       if _builtin(code) == schema.BuiltinOperator.FULLY_CONNECTED}
    if not fully_connected:
        return None
    codes = (min(fully_connected), _opcode_index(model, schema.BuiltinOperator.ADD))
    head_rows = _head_rows(model)
    buffers = _Buffers(model)
    replaced = set()
    for index, subgraph in enumerate(model.subgraphs):
        operators, orphans, made = [], set(), {}
        for op in subgraph.operators:
            weights = subgraph.tensors[op.inputs[1]] if op.opcodeIndex in fully_connected else None
            if (weights is None or weights.type != schema.TensorType.FLOAT32
                    or len(weights.shape) != 2 or not _is_constant(model, weights)
                    or op.builtinOptions.fusedActivationFunction
                    != schema.ActivationFunctionType.NONE):
                operators.append(op)
                continue
            orphans.add(int(op.inputs[1]))
            replaced.add(weights.buffer)
            rows, columns = (int(d) for d in weights.shape)
            if rows in head_rows or columns % BLOCK:
                operators.append(_as_int8(model, subgraph, op, weights, buffers, made))
            else:
                operators += _split_block_offsets(model, subgraph, op, weights, buffers, made,
                                                  codes)
        subgraph.operators = operators
        _drop_tensors(model, index, orphans)
    return replaced


def _as_int8(model, subgraph, op, weights, buffers, made, quantize=per_channel_int8):
    """`op` reading per-channel int8 weights (`quantize(weights) -> (values,
    scales)`)."""
    key = ("int8", weights.buffer)
    if key not in made:
        values, scale = quantize(_constant(model, weights))
        made[key] = _int8_tensor(subgraph, weights.name.decode() + "/int8",
                                 [int(d) for d in weights.shape],
                                 buffers.get(key, lambda: values), scale)
    op.inputs = np.asarray([op.inputs[0], made[key], *op.inputs[2:]], np.int32)
    return op


def _int8_tensor(subgraph, name, shape, buffer, scale):
    """An int8 weight tensor quantized per output row (symmetric)."""
    quantization = schema.QuantizationParametersT()
    quantization.scale = scale
    quantization.zeroPoint = np.zeros(len(scale), np.int64)
    quantization.quantizedDimension = 0
    return _add_tensor(subgraph, name, shape, schema.TensorType.INT8, buffer, quantization)


def _split_block_offsets(model, subgraph, op, weights, buffers, made, codes):
    """`op` as a blockwise-INT4 FULLY_CONNECTED plus its block offsets: the
    operators that replace it."""
    fc_code, add_code = codes
    rows, columns = (int(d) for d in weights.shape)
    blocks = columns // BLOCK
    key = ("int4", weights.buffer)
    if key not in made:
        name = weights.name.decode()
        code_buffer, scale_buffer, offset_buffer, offset_scale = buffers.int4(weights)
        made[key] = (_blockwise(subgraph, name + "/int4", (code_buffer, scale_buffer),
                                (rows, columns)),
                     _int8_tensor(subgraph, name + "/block_offsets", [rows, blocks],
                                  offset_buffer, offset_scale))
    kernel, offsets = made[key]
    sums_key = ("block_sum", columns)
    if sums_key not in made:
        ones = np.kron(np.eye(blocks, dtype=np.float32), np.ones((1, BLOCK), np.float32))
        made[sums_key] = _add_tensor(subgraph, f"int4/block_sum_{columns}", [blocks, columns],
                                     schema.TensorType.FLOAT32, buffers.get(sums_key, lambda: ones))
    output = int(op.outputs[0])
    target = subgraph.tensors[output]
    options = op.builtinOptions
    leading = [int(d) for d in subgraph.tensors[op.inputs[0]].shape[:-1]]
    if not options.keepNumDims:
        leading = [int(np.prod(leading))]
    name = target.name.decode()
    sums = _add_tensor(subgraph, name + "/block_sums", leading + [blocks], target.type)
    correction = _add_tensor(subgraph, name + "/block_offsets", leading + [rows], target.type)
    main = _add_tensor(subgraph, name + "/int4", [int(d) for d in target.shape], target.type)

    def fully_connected(inputs, result):
        fc_options = schema.FullyConnectedOptionsT()
        fc_options.fusedActivationFunction = schema.ActivationFunctionType.NONE
        fc_options.keepNumDims = options.keepNumDims
        return _operator(fc_code, inputs, result, schema.BuiltinOptions.FullyConnectedOptions,
                         fc_options)

    source = int(op.inputs[0])
    op.inputs = np.asarray([source, kernel, *op.inputs[2:]], np.int32)
    op.outputs = np.asarray([main], np.int32)
    add_options = schema.AddOptionsT()
    add_options.fusedActivationFunction = schema.ActivationFunctionType.NONE
    return [fully_connected([source, made[sums_key], -1], sums),
            fully_connected([sums, offsets, -1], correction),
            op,
            _operator(add_code, [main, correction], output, schema.BuiltinOptions.AddOptions,
                      add_options)]


def weight_summary(flatbuffer):
    """Bytes of constant weights by tensor type name, for reports and tests."""
    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    names = {value: key for key, value in vars(schema.TensorType).items() if key.isupper()}
    sizes = collections.Counter()
    seen = set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data
            if data is not None and len(data) and tensor.buffer not in seen:
                seen.add(tensor.buffer)
                sizes[names.get(tensor.type, str(tensor.type))] += len(data)
    return dict(sizes)
