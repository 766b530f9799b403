"""Fused projections for LiteRT files: one matmul where the model has several.

The model keeps one `Dense` per projection (TF-MOT prunes and quantizes them
one by one), so the converted step has three FULLY_CONNECTED ops reading the
same normalized activations for query, key and value, and two for the MLP's
gate and up. At batch 1 every op is a separate pass of XNNPACK's thread pool
over a few hundred kilobytes to a few megabytes of weights; one op over the
stacked weights streams them with fewer hand-offs. A synthetic chain of such
projections ran 3 to 4% faster stacked; on SmolLM2 float32 (with the
decode-step attention change) batch-1 decode measured about 2% faster, in
alternating processes on a noisy machine.

`fuse_projections` rewrites a converted flatbuffer: each group of
FULLY_CONNECTED ops with the same input, options and constant weights (float32
or per-channel int8) becomes one op whose weights are the group's stacked
along the output axis, followed by one SLICE per original output. Every
output is the same column of the same dot products as before, so the
results are bit-identical. The stacked weights replace the originals in the
file (a weight shared by several signatures is stacked once).

`split_signatures` cuts one converted file into several, each holding some
of its signatures with only the weights those read. An interpreter prepares
(packs for XNNPACK) every signature of its file when it first allocates, so
one file per decode step lets a process pay only for the steps it runs, at
the cost of one conversion, not one per file.

Example:
    >>> fused = fuse_projections(converter.convert())
    >>> first, rest = split_signatures(fused, [["prefill", "decode_b1"], ["decode_b4"]])
"""

import collections
import copy

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

_NUMPY_TYPES = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.INT8: np.int8}


def _serialize(model):
    """`model`'s flatbuffer bytes (a bytearray). The same bytes as
    `flatbuffer_utils.convert_object_to_bytearray`, three times faster on a
    half-gigabyte model: its builder starts at 1 KB and doubles (copying
    everything) about twenty times, where this one starts at the size of
    the weights."""
    size = sum(len(b.data) for b in model.buffers if b.data is not None) + (16 << 20)
    builder = flatbuffers.Builder(size)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return builder.Output()  # already a copy (a bytearray): no second one


def _builtin(code):
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _opcode_index(model, builtin, version=None):
    """The index of `builtin`'s operator code (at `version`, if given; any
    version otherwise), added (at `version` or 1) if the model has none."""
    for index, code in enumerate(model.operatorCodes):
        if _builtin(code) == builtin and version in (None, code.version):
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = version or 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _add_buffer(model, array):
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _add_tensor(subgraph, name, shape, dtype, buffer=0, quantization=None):
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = np.asarray(shape, np.int32)
    tensor.type = dtype
    tensor.buffer = buffer
    tensor.quantization = quantization
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _is_constant(model, tensor):
    """Whether the tensor holds constant data of a type we stack."""
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0 and tensor.type in _NUMPY_TYPES


def _constant(model, tensor):
    """The constant value of a tensor that `_is_constant` accepts (a view)."""
    data = np.asarray(model.buffers[tensor.buffer].data, np.uint8)
    return data.view(_NUMPY_TYPES[tensor.type]).reshape([int(d) for d in tensor.shape])


def _per_row(quantization, rows):
    """`(scale, zero_point)` per output row, or None if unquantized."""
    if quantization is None or quantization.scale is None or not len(quantization.scale):
        return None
    scale = np.asarray(quantization.scale, np.float32)
    if len(scale) > 1 and quantization.quantizedDimension != 0:
        return False  # quantized along the input axis: rows cannot be stacked
    zero = np.asarray(quantization.zeroPoint if quantization.zeroPoint is not None else [0],
                      np.int64)
    return np.broadcast_to(scale, [rows]), np.broadcast_to(zero, [rows])


def _group_key(model, subgraph, op):
    """What fusable FULLY_CONNECTED ops share, or None if `op` is not one."""
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        return None  # a bias
    weights = subgraph.tensors[op.inputs[1]]
    if len(weights.shape) != 2 or not _is_constant(model, weights):
        return None
    if _per_row(weights.quantization, int(weights.shape[0])) is False:
        return None
    options = op.builtinOptions
    return (int(op.inputs[0]), weights.type, int(weights.shape[1]),
            options.fusedActivationFunction, options.weightsFormat,
            options.asymmetricQuantizeInputs)


def fuse_projections(flatbuffer):
    """Return `flatbuffer` (a .tflite model's bytes) with FULLY_CONNECTED ops
    that read the same input stacked into one (see the module docstring)."""
    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    replaced = fuse_model(model)
    return flatbuffer if replaced is None else _serialize_without(model, replaced)


def fuse_model(model):
    """`fuse_projections` on a parsed model (a `schema.ModelT`), in place.
    Returns the buffers whose weights were stacked (no operator reads them
    any more), or None if the model has no FULLY_CONNECTED op."""
    fully_connected = {i for i, code in enumerate(model.operatorCodes)
                       if _builtin(code) == schema.BuiltinOperator.FULLY_CONNECTED}
    if not fully_connected:
        return None
    codes = (_opcode_index(model, schema.BuiltinOperator.SLICE),
             _opcode_index(model, schema.BuiltinOperator.RESHAPE))
    stacked = {}  # original weight buffers -> stacked buffer, shared by subgraphs
    replaced = set()
    for index, subgraph in enumerate(model.subgraphs):
        groups = collections.defaultdict(list)
        for op in subgraph.operators:
            if op.opcodeIndex in fully_connected:
                key = _group_key(model, subgraph, op)
                if key is not None:
                    groups[key].append(op)
        fused = {id(ops[0]): ops for ops in groups.values() if len(ops) > 1}
        dropped = {id(op) for ops in fused.values() for op in ops[1:]}
        operators, orphans = [], set()
        for op in subgraph.operators:
            if id(op) in fused:
                orphans.update(int(o.inputs[1]) for o in fused[id(op)])
                operators += _fuse(model, subgraph, fused[id(op)], stacked, codes)
            elif id(op) not in dropped:
                operators.append(op)
        subgraph.operators = operators
        replaced.update(subgraph.tensors[i].buffer for i in orphans)
        _drop_tensors(model, index, orphans)
    return replaced


def _serialize_without(model, replaced):
    """`_serialize(model)` after emptying the `replaced` buffers no tensor an
    operator reads uses any more."""
    used = {g.tensors[i].buffer for g in model.subgraphs for op in g.operators
            for i in (*op.inputs, *op.outputs) if i >= 0}
    for index in replaced - used:
        model.buffers[index].data = None
    return _serialize(model)


def split_signatures(flatbuffer, groups):
    """Files of `flatbuffer`'s signatures, one per group of signature keys.

    Each file keeps the subgraphs of its group's signatures (renumbered), the
    operator codes, and the data of the buffers its tensors use; every other
    buffer is left empty. Returns an iterator over the files' bytes in the
    order of `groups`, each made when asked for (so a caller writing them
    one by one holds one at a time); unknown keys raise at once.
    """
    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    by_key = {d.signatureKey.decode(): d for d in model.signatureDefs}
    missing = [k for group in groups for k in group if k not in by_key]
    if missing:
        raise ValueError(f"no signatures {missing} in the file (it has {sorted(by_key)})")
    return _split(model, [[by_key[k] for k in group] for group in groups])


def _split(model, groups):
    subgraphs, signatures = model.subgraphs, model.signatureDefs
    data = [buffer.data for buffer in model.buffers]
    keep_always = {0} | {m.buffer for m in (model.metadata or [])}
    try:
        for chosen in groups:
            model.subgraphs = [subgraphs[d.subgraphIndex] for d in chosen]
            model.signatureDefs = []
            for index, definition in enumerate(chosen):
                renumbered = copy.copy(definition)
                renumbered.subgraphIndex = index
                model.signatureDefs.append(renumbered)
            used = keep_always | {t.buffer for g in model.subgraphs for t in g.tensors}
            for index, buffer in enumerate(model.buffers):
                buffer.data = data[index] if index in used else None
            yield _serialize(model)
    finally:
        model.subgraphs, model.signatureDefs = subgraphs, signatures
        for buffer, value in zip(model.buffers, data):
            buffer.data = value


def _drop_tensors(model, subgraph_index, candidates):
    """Remove the tensors in `candidates` that no operator reads any more
    from subgraph `subgraph_index`, renumbering the rest everywhere."""
    subgraph = model.subgraphs[subgraph_index]
    used = {int(i) for op in subgraph.operators for i in (*op.inputs, *op.outputs)}
    used |= {int(i) for i in (*subgraph.inputs, *subgraph.outputs)}
    gone = sorted(candidates - used)
    if not gone:
        return
    shift = np.cumsum(np.isin(np.arange(len(subgraph.tensors)), gone))

    def renumber(indices):
        indices = np.asarray(indices, np.int32)
        return np.where(indices >= 0, indices - shift[np.maximum(indices, 0)], indices).astype(
            np.int32)

    for op in subgraph.operators:
        op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
        if op.intermediates is not None:
            op.intermediates = renumber(op.intermediates)
    subgraph.inputs, subgraph.outputs = renumber(subgraph.inputs), renumber(subgraph.outputs)
    for tensor in subgraph.tensors:  # blockwise quantization names its scales by index
        quantization = tensor.quantization
        if quantization is not None and \
                quantization.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
            details = quantization.details
            details.scales = int(renumber([details.scales])[0])
            details.zeroPoints = int(renumber([details.zeroPoints])[0])
    for signature in model.signatureDefs or ():
        if signature.subgraphIndex == subgraph_index:
            for entry in (*signature.inputs, *signature.outputs):
                entry.tensorIndex = int(renumber([entry.tensorIndex])[0])
    dropped = set(gone)
    subgraph.tensors = [t for i, t in enumerate(subgraph.tensors) if i not in dropped]


def _fuse(model, subgraph, ops, stacked, codes):
    """One FULLY_CONNECTED over the stacked weights of `ops`, then a SLICE
    into each of their outputs (and a RESHAPE where an op kept fewer
    dimensions than the first); returns the new operators."""
    slice_code, reshape_code = codes
    weights = [subgraph.tensors[op.inputs[1]] for op in ops]
    outputs = [int(op.outputs[0]) for op in ops]
    rows = [int(w.shape[0]) for w in weights]
    total = sum(rows)
    buffers = tuple(w.buffer for w in weights)
    if buffers not in stacked:
        stacked[buffers] = _add_buffer(model, np.concatenate([_constant(model, w) for w in weights]))
    quantization = None
    if _per_row(weights[0].quantization, rows[0]) is not None:
        pairs = [_per_row(w.quantization, n) for w, n in zip(weights, rows)]
        quantization = schema.QuantizationParametersT()
        quantization.scale = np.concatenate([scale for scale, _ in pairs])
        quantization.zeroPoint = np.concatenate([zero for _, zero in pairs])
        quantization.quantizedDimension = 0
    head = ops[0]
    name = subgraph.tensors[outputs[0]].name.decode() + "/fused"
    leading = [int(d) for d in subgraph.tensors[head.inputs[0]].shape[:-1]]
    if not head.builtinOptions.keepNumDims:
        leading = [int(np.prod(leading))]
    kernel = _add_tensor(subgraph, name + "/kernel", [total, weights[0].shape[1]],
                         weights[0].type, stacked[buffers], quantization)
    result = _add_tensor(subgraph, name, leading + [total], subgraph.tensors[outputs[0]].type)
    head.inputs = np.asarray([head.inputs[0], kernel, -1], np.int32)
    head.outputs = np.asarray([result], np.int32)
    new = [head]
    offset = 0
    for output, count in zip(outputs, rows):
        target = subgraph.tensors[output]
        piece = leading + [count]
        cut_output = output
        if [int(d) for d in target.shape] != piece:
            cut_output = _add_tensor(subgraph, f"{name}/piece_{offset}", piece, target.type)
        begin = _add_constant(model, subgraph, f"{name}/begin_{offset}",
                              [0] * len(leading) + [offset])
        size = _add_constant(model, subgraph, f"{name}/size_{offset}", piece)
        new.append(_operator(slice_code, [result, begin, size], cut_output,
                             schema.BuiltinOptions.SliceOptions, schema.SliceOptionsT()))
        if cut_output != output:
            shape = [int(d) for d in target.shape]
            options = schema.ReshapeOptionsT()
            options.newShape = np.asarray(shape, np.int32)
            new.append(_operator(reshape_code,
                                 [cut_output, _add_constant(model, subgraph,
                                                            f"{name}/shape_{offset}", shape)],
                                 output, schema.BuiltinOptions.ReshapeOptions, options))
        offset += count
    return new


def _add_constant(model, subgraph, name, values):
    values = np.asarray(values, np.int32)
    return _add_tensor(subgraph, name, [len(values)], schema.TensorType.INT32,
                       _add_buffer(model, values))


def _operator(code, inputs, output, options_type, options):
    op = schema.OperatorT()
    op.opcodeIndex = code
    op.inputs = np.asarray(inputs, np.int32)
    op.outputs = np.asarray([output], np.int32)
    op.builtinOptionsType = options_type
    op.builtinOptions = options
    return op
