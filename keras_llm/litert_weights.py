"""Weights put into a LiteRT file after TensorFlow's converter has run.

TensorFlow's converter takes the weights as constants of the traced graph:
its frozen graph, its MLIR module and its quantizer each hold copies of
them, and its passes run over every byte of every signature. For SmolLM2
(9 signatures) that was 126 s and 4.7 GB of the converter's own memory for
a 542 MB file (int8: 7.3 GB peak for the whole conversion).

`keras_llm.litert.convert` therefore traces the step functions with each
weight as one more input (`w_{j}`, Dense kernels transposed to the
`(out, in)` layout FULLY_CONNECTED reads, so the converter's transposes
cancel) and converts that weight-free graph, which takes seconds. The
operators are the same as with constant weights. `bind_weights` then turns
those inputs into constant tensors of one buffer per weight, shared by
every signature, which is what the converter writes for constant weights.

`quantize_int8` stores the weights as the converter's dynamic-range
quantization does: each FULLY_CONNECTED weight of at least 1024 values
per-channel int8 (symmetric, one scale per output row, activations
quantized per row at run time), and a GATHER's embedding table int8 with
one symmetric scale, its rows dequantized after the lookup; the codes are
the converter's own (the same rounding), so the file computes the same
logits as the converter's.

Example:
    >>> model = bind_weights(weight_free_flatbuffer, arrays)   # schema.ModelT
    >>> replaced = quantize_int8(model)
"""

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from keras_llm.litert_fusion import (_add_tensor, _builtin, _constant, _drop_tensors,
                                     _is_constant, _opcode_index, _operator)
from keras_llm.litert_int4 import _as_int8, _Buffers

WEIGHT_INPUT = "w_"
MIN_QUANTIZED_ELEMENTS = 1024  # the converter's own threshold for dynamic-range weights


def bind_weights(flatbuffer, arrays, names=None):
    """Parse `flatbuffer` (a converted file whose signatures take weights as
    inputs named `w_{j}`) and return it (a `schema.ModelT`) with those
    inputs made constant tensors holding `arrays[j]`.

    Each array becomes one buffer shared by every signature that reads it;
    the buffer is a view of the array, and the list's entries are cleared
    as they are taken (the model then owns the only reference, so a later
    pass that replaces a buffer frees its memory). `names[j]`, if given,
    renames the tensors.
    """
    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    views = {}
    for definition in model.signatureDefs:
        subgraph = model.subgraphs[definition.subgraphIndex]
        bound, kept = {}, []
        for entry in definition.inputs:
            name = entry.name.decode()
            number = name[len(WEIGHT_INPUT):]
            if name.startswith(WEIGHT_INPUT) and number.isdigit():
                bound[int(entry.tensorIndex)] = int(number)
            else:
                kept.append(entry)
        definition.inputs = kept
        subgraph.inputs = np.asarray([i for i in subgraph.inputs if int(i) not in bound], np.int32)
        for index, j in bound.items():
            if j not in views:
                if arrays[j] is None:
                    raise ValueError(f"weight input {WEIGHT_INPUT}{j} has no array")
                views[j] = np.ascontiguousarray(arrays[j], np.float32)
                arrays[j] = None
            tensor = subgraph.tensors[index]
            if tuple(int(d) for d in tensor.shape) != views[j].shape:
                raise ValueError(f"weight {WEIGHT_INPUT}{j}: the file reads shape "
                                 f"{list(tensor.shape)}, the array is {list(views[j].shape)}")
            tensor.buffer = _buffer(model, views, j)
            tensor.shapeSignature = None
            if names is not None:
                tensor.name = names[j].encode()
    return model


def _buffer(model, views, j):
    key = ("buffer", j)
    if key not in views:
        buffer = schema.BufferT()
        buffer.data = views[j].reshape(-1).view(np.uint8)
        model.buffers.append(buffer)
        views[key] = len(model.buffers) - 1
    return views[key]


def _round(values):
    """Round half away from zero (C's `round`), as the converter does."""
    return np.trunc(values + np.copysign(0.5, values))


def converter_int8(weights):
    """Symmetric per-row int8 codes and scales of `weights` `(out, in)`,
    computed as TensorFlow's converter computes them (in double precision:
    the weight over the row's largest magnitude / 127, rounded half away
    from zero), so that a file quantized here holds the converter's codes."""
    weights = np.asarray(weights, np.float32)
    scale = np.abs(weights).max(axis=1).astype(np.float64) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    codes = _round(weights.astype(np.float64) / scale[:, None])
    return np.clip(codes, -127, 127).astype(np.int8), scale.astype(np.float32)


def quantize_int8(model, min_elements=MIN_QUANTIZED_ELEMENTS):
    """Dynamic-range int8 weights in a parsed float32 model, in place (see
    the module docstring). Returns the float32 buffers replaced."""
    fully_connected = {i for i, code in enumerate(model.operatorCodes)
                       if _builtin(code) == schema.BuiltinOperator.FULLY_CONNECTED}
    gather = {i for i, code in enumerate(model.operatorCodes)
              if _builtin(code) == schema.BuiltinOperator.GATHER}
    # The versions TensorFlow Lite's op_version.cc gives these operators
    # with int8 weights (the converter's own file has them): the runtime
    # reads a hybrid FULLY_CONNECTED's per-channel scales only from
    # version 12 on.
    hybrid = _opcode_index(model, schema.BuiltinOperator.FULLY_CONNECTED, 12)
    gather_int8 = _opcode_index(model, schema.BuiltinOperator.GATHER, 2)
    dequantize = _opcode_index(model, schema.BuiltinOperator.DEQUANTIZE, 2)
    buffers = _Buffers(model)
    replaced = set()
    for index, subgraph in enumerate(model.subgraphs):
        operators, orphans, made = [], set(), {}
        for op in subgraph.operators:
            operators.append(op)
            if op.opcodeIndex not in fully_connected | gather:
                continue
            position = 1 if op.opcodeIndex in fully_connected else 0
            weights = subgraph.tensors[op.inputs[position]]
            if (weights.type != schema.TensorType.FLOAT32 or len(weights.shape) != 2
                    or not _is_constant(model, weights)
                    or int(np.prod(weights.shape)) < min_elements):
                continue
            orphans.add(int(op.inputs[position]))
            replaced.add(weights.buffer)
            if position == 1:
                _as_int8(model, subgraph, op, weights, buffers, made, converter_int8)
                op.builtinOptions.asymmetricQuantizeInputs = True
                op.opcodeIndex = hybrid
            else:
                op.opcodeIndex = gather_int8
                operators.append(_gather_int8(model, subgraph, op, weights, buffers, made,
                                              dequantize))
        subgraph.operators = operators
        _drop_tensors(model, index, orphans)
    return replaced


def _gather_int8(model, subgraph, op, table, buffers, made, dequantize):
    """Point GATHER `op` at an int8 copy of `table` (one scale) and return
    the DEQUANTIZE that turns its rows back into the float32 output."""
    key = ("int8-table", table.buffer)
    if key not in made:
        values = _constant(model, table)
        scale = float(np.abs(values).max()) / 127.0 or 1.0
        codes = lambda: np.clip(_round(values.astype(np.float64) / scale),  # noqa: E731
                                -127, 127).astype(np.int8)
        made[key] = (_add_tensor(subgraph, table.name.decode() + "/int8",
                                 [int(d) for d in table.shape], schema.TensorType.INT8,
                                 buffers.get(key, codes), _per_tensor(scale)), scale)
    table_int8, scale = made[key]
    output = int(op.outputs[0])
    target = subgraph.tensors[output]
    rows = _add_tensor(subgraph, target.name.decode() + "/int8", [int(d) for d in target.shape],
                       schema.TensorType.INT8, quantization=_per_tensor(scale))
    op.inputs = np.asarray([table_int8, *op.inputs[1:]], np.int32)
    op.outputs = np.asarray([rows], np.int32)
    return _operator(dequantize, [rows], output, schema.BuiltinOptions.NONE, None)


def _per_tensor(scale):
    quantization = schema.QuantizationParametersT()
    quantization.scale = np.asarray([scale], np.float32)
    quantization.zeroPoint = np.zeros(1, np.int64)
    quantization.quantizedDimension = 0
    return quantization
