"""TF Serving's tensors and signatures as numpy, without TensorFlow: dtypes,
`TensorProto` <-> numpy, and the signature defs of a SavedModel file.

TensorFlow's own `make_ndarray`/`make_tensor_proto` need TensorFlow
imported; a server decoding with LiteRT does without it. The rules are
TensorFlow's: numbers travel as little-endian `tensor_content` (or a typed
value field, where fewer values than the shape repeat the last one),
strings as `string_val`, float16 as the bit patterns in `half_val`.
"""

import dataclasses
import os

import numpy as np

from keras_llm.serving.protos import tf_serving


@dataclasses.dataclass(frozen=True)
class DType:
    """One TensorFlow dtype: its name, `DataType` number, numpy type and
    the `TensorProto` field its values go in."""

    name: str
    as_datatype_enum: int
    as_numpy_dtype: type
    field: str

    @property
    def size(self):
        return np.dtype(self.as_numpy_dtype).itemsize

    @property
    def is_floating(self):
        return self.name in ("float16", "float32", "float64")

    @property
    def is_integer(self):
        return "int" in self.name

    @property
    def is_bool(self):
        return self.name == "bool"


_TYPES = [("float32", "DT_FLOAT", np.float32, "float_val"),
          ("float64", "DT_DOUBLE", np.float64, "double_val"),
          ("float16", "DT_HALF", np.float16, "half_val"),
          ("int32", "DT_INT32", np.int32, "int_val"),
          ("int16", "DT_INT16", np.int16, "int_val"),
          ("int8", "DT_INT8", np.int8, "int_val"),
          ("uint8", "DT_UINT8", np.uint8, "int_val"),
          ("uint16", "DT_UINT16", np.uint16, "int_val"),
          ("int64", "DT_INT64", np.int64, "int64_val"),
          ("uint32", "DT_UINT32", np.uint32, "uint32_val"),
          ("uint64", "DT_UINT64", np.uint64, "uint64_val"),
          ("bool", "DT_BOOL", np.bool_, "bool_val"),
          ("string", "DT_STRING", object, "string_val")]
DTYPES = {tf_serving.DATA_TYPES[enum]: DType(name, tf_serving.DATA_TYPES[enum], numpy, field)
          for name, enum, numpy, field in _TYPES}
_BY_NUMPY = {np.dtype(d.as_numpy_dtype): d for d in DTYPES.values() if d.name != "string"}
_NAMES = {value: name.lower()[3:] for name, value in tf_serving.DATA_TYPES.items()}


def dtype_name(enum):
    """A `DataType` number's name (`float`, `int32`, ...), for messages."""
    dtype = DTYPES.get(enum)
    return dtype.name if dtype else _NAMES.get(enum, f"unknown dtype enum {enum}")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A signature's shape: a tuple of sizes, None where any size fits
    (`dims` None: any rank)."""

    dims: tuple = None

    @classmethod
    def from_proto(cls, proto):
        if proto.unknown_rank:
            return cls(None)
        return cls(tuple(None if d.size < 0 else int(d.size) for d in proto.dim))

    def is_compatible_with(self, shape):
        if self.dims is None:
            return True
        shape = tuple(shape)
        return len(shape) == len(self.dims) and all(
            want is None or want == got for want, got in zip(self.dims, shape))

    def __str__(self):
        if self.dims is None:
            return "<unknown>"
        return "(" + ", ".join("None" if d is None else str(d) for d in self.dims) + ")"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: Shape
    dtype: DType


def make_ndarray(proto):
    """The numpy array of a `TensorProto` (object array of bytes for
    strings). Raises ValueError for what does not fit its shape."""
    dtype = DTYPES.get(proto.dtype)
    if dtype is None:
        raise ValueError(f"dtype {dtype_name(proto.dtype)} is not supported")
    shape = [d.size for d in proto.tensor_shape.dim]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if proto.tensor_content:
        if dtype.name == "string":
            raise ValueError("string tensors cannot use tensor_content")
        numpy = np.dtype(dtype.as_numpy_dtype).newbyteorder("<")
        return np.frombuffer(proto.tensor_content, numpy).astype(dtype.as_numpy_dtype).reshape(shape)
    values = getattr(proto, dtype.field)
    if dtype.name == "string":
        array = np.empty([len(values)], object)
        array[:] = list(values)
    elif dtype.name == "float16":
        array = np.asarray(values, np.uint16).view(np.float16)
    else:
        array = np.asarray(values, dtype.as_numpy_dtype)
    if len(array) > count:
        raise ValueError(f"{len(array)} values for shape {shape}")
    if len(array) < count:  # as TensorFlow: the last value repeats (zeros if none)
        fill = array[-1] if len(array) else (b"" if dtype.name == "string" else 0)
        array = np.concatenate([array, np.full([count - len(array)], fill, array.dtype)])
    return array.reshape(shape)


def make_tensor_proto(value):
    """A `TensorProto` of a numpy array (or what `np.asarray` takes);
    strings (str or bytes) become `string_val`."""
    array = np.asarray(value)
    proto = tf_serving.TensorProto()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype == object or array.dtype.kind in "US":
        proto.dtype = tf_serving.DATA_TYPES["DT_STRING"]
        proto.string_val.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v)
                                for v in array.reshape(-1))
        return proto
    dtype = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if dtype is None:
        raise ValueError(f"numpy dtype {array.dtype} has no TensorFlow dtype here")
    proto.dtype = dtype.as_datatype_enum
    proto.tensor_content = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    return proto


def read_signature_defs(export_dir):
    """`{key: SignatureDef}` of the SavedModel in `export_dir` (its first
    meta graph, as TF Serving serves), read without TensorFlow."""
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as handle:
        saved = tf_serving.SavedModel.FromString(handle.read())
    if not saved.meta_graphs:
        raise ValueError(f"{export_dir}/saved_model.pb holds no meta graph")
    signatures = {}
    for key, definition in saved.meta_graphs[0].signature_def.items():
        # copies: a part of the parsed file would keep all of it (the graph) alive
        signatures[key] = tf_serving.SignatureDef()
        signatures[key].CopyFrom(definition)
    return signatures


def input_specs(signature_defs):
    """`{signature: {input: TensorSpec}}` of signature defs."""
    return {key: {name: TensorSpec(Shape.from_proto(info.tensor_shape),
                                   DTYPES.get(info.dtype) or DType(dtype_name(info.dtype),
                                                                   info.dtype, object, ""))
                  for name, info in definition.inputs.items()}
            for key, definition in signature_defs.items()}
