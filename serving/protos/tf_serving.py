"""TF Serving's wire messages, without TensorFlow.

`tensorflow_serving.apis` imports TensorFlow's own generated protos, and
importing any of them imports all of TensorFlow (3 s, 590 MB of memory). A
server whose engine decodes with LiteRT needs neither, so the messages it
speaks are declared here: the fields keras-llm reads and writes, with TF
Serving's own message names, field numbers and types, so that the bytes on
the wire are TF Serving's (`tests/test_serving_protos.py` checks every field
against `tensorflow_serving`'s descriptors). Fields a client sends that are
not declared here are kept as unknown fields and ignored.

The messages live in a descriptor pool of their own: TensorFlow, imported
later in the same process (for a `score` Predict or an XLA engine), adds
its own `tensorflow.TensorProto` and friends to the default pool, and the
two never meet.
"""

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

# (name, number, type, repeated); type is a scalar type name, or a message or
# enum name (relative to the package, or fully qualified with a leading
# dot); "map<K,V>" declares a map field; a fifth element names a oneof.
_TENSORFLOW = {
    "package": "tensorflow",
    "enums": {
        "DataType": [("DT_INVALID", 0), ("DT_FLOAT", 1), ("DT_DOUBLE", 2), ("DT_INT32", 3),
                     ("DT_UINT8", 4), ("DT_INT16", 5), ("DT_INT8", 6), ("DT_STRING", 7),
                     ("DT_COMPLEX64", 8), ("DT_INT64", 9), ("DT_BOOL", 10),
                     ("DT_BFLOAT16", 14), ("DT_UINT16", 17), ("DT_COMPLEX128", 18),
                     ("DT_HALF", 19), ("DT_UINT32", 22), ("DT_UINT64", 23)],
    },
    "messages": {
        "TensorShapeProto.Dim": [("size", 1, "int64"), ("name", 2, "string")],
        "TensorShapeProto": [("dim", 2, "TensorShapeProto.Dim", True),
                             ("unknown_rank", 3, "bool")],
        "TensorProto": [("dtype", 1, "DataType"), ("tensor_shape", 2, "TensorShapeProto"),
                        ("version_number", 3, "int32"), ("tensor_content", 4, "bytes"),
                        ("half_val", 13, "int32", True), ("float_val", 5, "float", True),
                        ("double_val", 6, "double", True), ("int_val", 7, "int32", True),
                        ("string_val", 8, "bytes", True), ("scomplex_val", 9, "float", True),
                        ("int64_val", 10, "int64", True), ("bool_val", 11, "bool", True),
                        ("dcomplex_val", 12, "double", True), ("uint32_val", 16, "uint32", True),
                        ("uint64_val", 17, "uint64", True), ("float8_val", 18, "bytes")],
        "TensorInfo": [("name", 1, "string", False, "encoding"), ("dtype", 2, "DataType"),
                       ("tensor_shape", 3, "TensorShapeProto")],
        "SignatureDef": [("inputs", 1, "map<string,TensorInfo>"),
                         ("outputs", 2, "map<string,TensorInfo>"),
                         ("method_name", 3, "string"),
                         ("defaults", 4, "map<string,TensorProto>")],
        # A SavedModel file, read for its signatures only (the graph and the
        # rest stay unknown fields).
        "MetaGraphDef": [("signature_def", 5, "map<string,SignatureDef>")],
        "SavedModel": [("saved_model_schema_version", 1, "int64"),
                       ("meta_graphs", 2, "MetaGraphDef", True)],
    },
}

_POLICY = "FileSystemStoragePathSourceConfig.ServableVersionPolicy"
_SERVING = {
    "package": "tensorflow.serving",
    "enums": {
        "ModelVersionStatus.State": [("UNKNOWN", 0), ("START", 10), ("LOADING", 20),
                                     ("AVAILABLE", 30), ("UNLOADING", 40), ("END", 50)],
        "ModelType": [("MODEL_TYPE_UNSPECIFIED", 0), ("TENSORFLOW", 1), ("OTHER", 2)],
    },
    "messages": {
        "ModelSpec": [("name", 1, "string"),
                      ("version", 2, ".google.protobuf.Int64Value", False, "version_choice"),
                      ("version_label", 4, "string", False, "version_choice"),
                      ("signature_name", 3, "string")],
        "PredictRequest": [("model_spec", 1, "ModelSpec"),
                           ("inputs", 2, "map<string,.tensorflow.TensorProto>"),
                           ("output_filter", 3, "string", True)],
        "PredictResponse": [("model_spec", 2, "ModelSpec"),
                            ("outputs", 1, "map<string,.tensorflow.TensorProto>")],
        "SignatureDefMap": [("signature_def", 1, "map<string,.tensorflow.SignatureDef>")],
        "GetModelMetadataRequest": [("model_spec", 1, "ModelSpec"),
                                    ("metadata_field", 2, "string", True)],
        "GetModelMetadataResponse": [("model_spec", 1, "ModelSpec"),
                                     ("metadata", 2, "map<string,.google.protobuf.Any>")],
        # error_code is TensorFlow's `tensorflow.error.Code` enum: a varint
        # either way on the wire.
        "StatusProto": [("error_code", 1, "int32"), ("error_message", 2, "string")],
        "ModelVersionStatus": [("version", 1, "int64"), ("state", 2, "ModelVersionStatus.State"),
                               ("status", 3, "StatusProto")],
        "GetModelStatusRequest": [("model_spec", 1, "ModelSpec")],
        "GetModelStatusResponse": [("model_version_status", 1, "ModelVersionStatus", True)],
        f"{_POLICY}.Latest": [("num_versions", 1, "uint32")],
        f"{_POLICY}.All": [],
        f"{_POLICY}.Specific": [("versions", 1, "int64", True)],
        _POLICY: [("latest", 100, f"{_POLICY}.Latest", False, "policy_choice"),
                  ("all", 101, f"{_POLICY}.All", False, "policy_choice"),
                  ("specific", 102, f"{_POLICY}.Specific", False, "policy_choice")],
        "FileSystemStoragePathSourceConfig": [],
        "LogCollectorConfig": [("type", 1, "string"), ("filename_prefix", 2, "string")],
        "SamplingConfig": [("sampling_rate", 1, "double"), ("attributes", 2, "int32")],
        "LoggingConfig": [("log_collector_config", 1, "LogCollectorConfig"),
                          ("sampling_config", 2, "SamplingConfig"),
                          ("custom_logging_config", 3, ".google.protobuf.Any")],
        "ModelConfig": [("name", 1, "string"), ("base_path", 2, "string"),
                        ("model_type", 3, "ModelType"), ("model_platform", 4, "string"),
                        ("model_version_policy", 7, _POLICY),
                        ("version_labels", 8, "map<string,int64>"),
                        ("logging_config", 6, "LoggingConfig")],
        "ModelConfigList": [("config", 1, "ModelConfig", True)],
        "ModelServerConfig": [("model_config_list", 1, "ModelConfigList", False, "config"),
                              ("custom_model_config", 2, ".google.protobuf.Any", False,
                               "config")],
        "ReloadConfigRequest": [("config", 1, "ModelServerConfig"),
                                ("metric_names", 2, "string", True)],
        "Metric": [("name", 1, "string"),
                   ("int64_value_increase", 2, "int64", False, "value_increase")],
        "ReloadConfigResponse": [("status", 1, "StatusProto"), ("metric", 2, "Metric", True)],
    },
}

_SCALARS = {name: getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{name.upper()}")
            for name in ("double", "float", "int64", "uint64", "int32", "bool", "string",
                         "bytes", "uint32", "sint64")}
_F = descriptor_pb2.FieldDescriptorProto


def _file(spec, name, dependencies):
    """A `FileDescriptorProto` of one package's spec."""
    package = spec["package"]
    proto = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3",
                                               dependency=dependencies)
    messages = {}

    def message(path):
        """The (nested) `DescriptorProto` at dotted `path`, made on first use."""
        if path not in messages:
            parent, _, leaf = path.rpartition(".")
            container = message(parent).nested_type if parent else proto.message_type
            messages[path] = container.add(name=leaf)
        return messages[path]

    enums = set(spec["enums"])
    for path, values in spec["enums"].items():
        parent, _, leaf = path.rpartition(".")
        container = message(parent).enum_type if parent else proto.enum_type
        enum = container.add(name=leaf)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)

    def set_type(field, type_name):
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
            return
        field.type = _F.TYPE_ENUM if type_name in enums else _F.TYPE_MESSAGE
        field.type_name = type_name if type_name.startswith(".") else f".{package}.{type_name}"

    for path, fields in spec["messages"].items():
        target = message(path)
        oneofs = {}
        for entry in fields:
            field_name, number, type_name = entry[:3]
            repeated = len(entry) > 3 and entry[3]
            field = target.field.add(name=field_name, number=number,
                                     label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
                                     json_name=_json_name(field_name))
            if type_name.startswith("map<"):
                key, value = type_name[4:-1].split(",")
                entry_name = "".join(part.title() for part in field_name.split("_")) + "Entry"
                map_entry = target.nested_type.add(name=entry_name)
                map_entry.options.map_entry = True
                for item_name, item_number, item_type in (("key", 1, key), ("value", 2, value)):
                    item = map_entry.field.add(name=item_name, number=item_number,
                                               label=_F.LABEL_OPTIONAL, json_name=item_name)
                    set_type(item, item_type)
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{package}.{path}.{entry_name}"
            else:
                set_type(field, type_name)
            if len(entry) > 4:
                if entry[4] not in oneofs:
                    oneofs[entry[4]] = len(target.oneof_decl)
                    target.oneof_decl.add(name=entry[4])
                field.oneof_index = oneofs[entry[4]]
    return proto


def _json_name(name):
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def _build():
    pool = descriptor_pool.DescriptorPool()
    for module in (any_pb2, wrappers_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    files = [_file(_TENSORFLOW, "keras_llm/tensorflow_types.proto",
                   ["google/protobuf/any.proto"]),
             _file(_SERVING, "keras_llm/tensorflow_serving_apis.proto",
                   ["keras_llm/tensorflow_types.proto", "google/protobuf/any.proto",
                    "google/protobuf/wrappers.proto"])]
    for file in files:
        pool.Add(file)
    return pool


POOL = _build()


def _message(full_name):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


TensorProto = _message("tensorflow.TensorProto")
TensorShapeProto = _message("tensorflow.TensorShapeProto")
SignatureDef = _message("tensorflow.SignatureDef")
SavedModel = _message("tensorflow.SavedModel")
ModelSpec = _message("tensorflow.serving.ModelSpec")
PredictRequest = _message("tensorflow.serving.PredictRequest")
PredictResponse = _message("tensorflow.serving.PredictResponse")
SignatureDefMap = _message("tensorflow.serving.SignatureDefMap")
GetModelMetadataRequest = _message("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = _message("tensorflow.serving.GetModelMetadataResponse")
GetModelStatusRequest = _message("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = _message("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = _message("tensorflow.serving.ModelVersionStatus")
ModelServerConfig = _message("tensorflow.serving.ModelServerConfig")
ReloadConfigRequest = _message("tensorflow.serving.ReloadConfigRequest")
ReloadConfigResponse = _message("tensorflow.serving.ReloadConfigResponse")

# name -> enum number, of TensorFlow's `DataType`
DATA_TYPES = {value.name: value.number
              for value in POOL.FindEnumTypeByName("tensorflow.DataType").values}
# state name -> number, of `ModelVersionStatus.State`
VERSION_STATES = {value.name: value.number for value in
                  POOL.FindEnumTypeByName("tensorflow.serving.ModelVersionStatus.State").values}

# gRPC services: name -> {method: (request class, response class)}
SERVICES = {
    "tensorflow.serving.PredictionService": {
        "Classify": (None, None), "Regress": (None, None), "MultiInference": (None, None),
        "Predict": (PredictRequest, PredictResponse),
        "GetModelMetadata": (GetModelMetadataRequest, GetModelMetadataResponse),
    },
    "tensorflow.serving.ModelService": {
        "GetModelStatus": (GetModelStatusRequest, GetModelStatusResponse),
        "HandleReloadConfigRequest": (ReloadConfigRequest, ReloadConfigResponse),
    },
}
