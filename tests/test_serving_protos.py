"""The server's TensorFlow-free TF Serving messages and tensors
(`serving/protos/tf_serving.py`, `serving/tensors.py`) against TF Serving's
and TensorFlow's own: the same fields on the wire, the same arrays."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.saved_model import loader_impl
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_management_pb2, predict_pb2)
from tensorflow_serving.config import model_server_config_pb2

from keras_llm.serving import tensors
from keras_llm.serving.protos import tf_serving


def _declared(descriptor, seen):
    """Every message type reachable from `descriptor` in our pool."""
    if descriptor.full_name in seen or descriptor.full_name.startswith("google."):
        return
    seen[descriptor.full_name] = descriptor
    for field in descriptor.fields:
        if field.message_type is not None:
            _declared(field.message_type, seen)


def test_every_declared_field_is_tf_servings_own():
    ours = {}
    for name in ("PredictRequest", "PredictResponse", "GetModelMetadataResponse",
                 "GetModelMetadataRequest", "SignatureDefMap", "GetModelStatusRequest",
                 "GetModelStatusResponse", "ReloadConfigRequest", "ReloadConfigResponse"):
        _declared(getattr(tf_serving, name).DESCRIPTOR, ours)
    _declared(tf_serving.SavedModel.DESCRIPTOR, ours)
    # theirs: the descriptors TensorFlow and TF Serving register by default
    theirs_pool = predict_pb2.DESCRIPTOR.pool
    assert {"tensorflow.TensorProto", "tensorflow.serving.ModelConfig",
            "tensorflow.SignatureDef", "tensorflow.MetaGraphDef"} <= set(ours)
    for full_name, descriptor in ours.items():
        theirs = theirs_pool.FindMessageTypeByName(full_name)
        assert descriptor is not theirs
        for field in descriptor.fields:
            other = theirs.fields_by_number[field.number]
            where = f"{full_name}.{field.name}"
            assert (field.name, field.is_repeated) == (other.name, other.is_repeated), where
            if field.message_type is not None:
                assert field.message_type.full_name == other.message_type.full_name, where
            elif field.enum_type is not None:
                assert field.enum_type.full_name == other.enum_type.full_name, where
                assert {v.name: v.number for v in field.enum_type.values}.items() <= {
                    v.name: v.number for v in other.enum_type.values}.items(), where
            elif other.enum_type is not None:  # our int32 for their enum: the same varint
                assert field.type == field.TYPE_INT32, where
            else:
                assert field.type == other.type, where
            assert getattr(field.containing_oneof, "name", None) == \
                getattr(other.containing_oneof, "name", None), where


def test_messages_cross_the_wire_both_ways():
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.version.value = 7
    request.model_spec.signature_name = "generate"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(np.array([b"hi", b"yo"])))
    request.inputs["max_new_tokens"].CopyFrom(tf.make_tensor_proto(np.array([3, 4], np.int32)))
    request.output_filter.append("text")
    request.predict_streamed_options.return_single_response = True  # not declared here
    ours = tf_serving.PredictRequest.FromString(request.SerializeToString())
    assert ours.model_spec.version.value == 7 and list(ours.output_filter) == ["text"]
    assert tensors.make_ndarray(ours.inputs["text"]).tolist() == [b"hi", b"yo"]
    # what we do not read is kept, byte for byte
    assert predict_pb2.PredictRequest.FromString(ours.SerializeToString()) == request

    status = tf_serving.GetModelStatusResponse()
    version = status.model_version_status.add(version=3)
    version.state = tf_serving.VERSION_STATES["AVAILABLE"]
    version.status.error_message = "fine"
    theirs = get_model_status_pb2.GetModelStatusResponse.FromString(status.SerializeToString())
    assert theirs.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE

    metadata = tf_serving.GetModelMetadataResponse()
    signatures = tf_serving.SignatureDefMap()
    signatures.signature_def["score"].method_name = "tensorflow/serving/predict"
    metadata.metadata["signature_def"].Pack(signatures)
    theirs = get_model_metadata_pb2.GetModelMetadataResponse.FromString(
        metadata.SerializeToString())
    unpacked = get_model_metadata_pb2.SignatureDefMap()
    assert theirs.metadata["signature_def"].Unpack(unpacked)
    assert unpacked.signature_def["score"].method_name == "tensorflow/serving/predict"

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(name="a", base_path="/m", model_platform="tensorflow")
    model.model_version_policy.specific.versions.extend([1, 2])
    model.version_labels["stable"] = 2
    model.logging_config.sampling_config.sampling_rate = 0.5
    reload = model_management_pb2.ReloadConfigRequest(config=config)
    ours = tf_serving.ReloadConfigRequest.FromString(reload.SerializeToString())
    mine = ours.config.model_config_list.config[0]
    assert list(mine.model_version_policy.specific.versions) == [1, 2]
    assert dict(mine.version_labels) == {"stable": 2}


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1.5, -2.25], np.float16),
    np.array([[1, -2]], np.int64), np.array([7], np.int32), np.array([3, 250], np.uint8),
    np.array([True, False]), np.array(2.5, np.float64),
    np.array([[b"a", b"\xff\x00"]], dtype=object), np.zeros([0, 3], np.int32)])
def test_tensors_are_tensorflows(value):
    ours = tensors.make_tensor_proto(value)
    theirs = tf.make_tensor_proto(value)
    np.testing.assert_array_equal(tf.make_ndarray(type(theirs).FromString(ours.SerializeToString())),
                                  value)
    back = tensors.make_ndarray(tf_serving.TensorProto.FromString(theirs.SerializeToString()))
    assert back.dtype == value.dtype and back.shape == value.shape
    np.testing.assert_array_equal(back, value)


def test_typed_values_fill_as_tensorflow_does():
    for dtype, values in ((np.float32, [1.5]), (np.int32, [4, 5]), (np.bool_, []),
                          (np.float16, [0.5])):
        theirs = tf.make_tensor_proto(values, dtype=tf.as_dtype(dtype), shape=[2, 2])
        assert not theirs.tensor_content
        ours = tf_serving.TensorProto.FromString(theirs.SerializeToString())
        np.testing.assert_array_equal(tensors.make_ndarray(ours), tf.make_ndarray(theirs))
    too_many = tf_serving.TensorProto(dtype=tf_serving.DATA_TYPES["DT_INT32"])
    too_many.tensor_shape.dim.add(size=1)
    too_many.int_val.extend([1, 2])
    with pytest.raises(ValueError, match="2 values"):
        tensors.make_ndarray(too_many)


def test_signature_defs_read_without_tensorflow_are_the_savedmodels(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x, n: {"y": tf.strings.join([x, x]), "k": n * 2},
                           input_signature=[tf.TensorSpec([None], tf.string, name="x"),
                                            tf.TensorSpec([None, 3], tf.int32, name="n")])
    tf.saved_model.save(module, str(tmp_path), signatures={"twice": module.f})
    expected = loader_impl.parse_saved_model(str(tmp_path)).meta_graphs[0].signature_def
    got = tensors.read_signature_defs(str(tmp_path))
    assert set(got) == set(expected)
    for key, definition in got.items():
        assert definition.SerializeToString(deterministic=True) == \
            expected[key].SerializeToString(deterministic=True)
    specs = tensors.input_specs(got)["twice"]
    assert specs["x"].dtype.name == "string" and str(specs["n"].shape) == "(None, 3)"
    assert specs["n"].shape.is_compatible_with((5, 3)) and not specs["n"].shape.is_compatible_with((5,))
