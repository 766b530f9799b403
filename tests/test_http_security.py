"""TLS (TF Serving's --ssl_config_file) and API keys on gRPC and HTTP, with
certificates made by the openssl command line; the real server on loopback."""

import json
import ssl
import subprocess

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)
import tensorflow as tf

from keras_llm.export.saved_model import export_model
from keras_llm.serving.engine import EngineConfig
from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc
from keras_llm.serving.server import Server, read_ssl_config
from tests.helpers import tiny_language_model

TIMEOUT = 120
KEY = "s3cret-key"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=keras-llm test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                  "extendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out",
                 f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "2", "-extfile",
                 f"{who}.ext", cwd=d)
    return d


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("secure")
    export_model(tiny_language_model(seed=3), base, "tiny", max_new_tokens=4, progress=False)
    return base / "tiny"


def _ssl_config_file(pki, path, client_verify):
    """An --ssl_config_file as TF Serving documents it (PEM text inline)."""
    text = "".join(f"{key}: {json.dumps((pki / name).read_text())}\n" for key, name in (
        ("server_key", "server.key"), ("server_cert", "server.pem"), ("custom_ca", "ca.pem")))
    path.write_text(text + f"client_verify: {'true' if client_verify else 'false'}\n")
    return read_ssl_config(str(path))


def _server(export_dir, ssl_config, api_key=None):
    return Server({"tiny": str(export_dir)}, port=0, poll_seconds=0, rest_api_port=0,
                  engine_config=EngineConfig(max_slots=2, max_length=64, prompt_bucket=16),
                  ssl_config=ssl_config, api_key=api_key)


def _predict_request():
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.inputs["prompt"].CopyFrom(tf.make_tensor_proto(["he"]))
    return request


def _secure_channel(srv, pki, client_cert=False):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None)
    return grpc.secure_channel(f"localhost:{srv.port}", credentials)


@pytest.fixture(scope="module")
def secured(export_dir, pki, tmp_path_factory):
    config = _ssl_config_file(pki, tmp_path_factory.mktemp("cfg") / "ssl.config", False)
    srv = _server(export_dir, config, api_key=KEY)
    yield srv
    srv.drain(0)


def test_https_needs_the_ca_and_the_key(secured, pki):
    url = f"https://localhost:{secured.rest_api_port}"
    ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with httpx.Client(base_url=url, verify=ca, timeout=TIMEOUT) as http:
        assert http.get("/health").status_code == 200  # health needs no key
        assert http.get("/v1/models/tiny").status_code == 401
        assert http.get("/v1/models/tiny",
                        headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = http.get("/v1/models/tiny", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["model_version_status"]
        assert http.post("/v1/models/tiny:predict",
                         json={"instances": ["he"]}).json()["error"].startswith("missing")
        assert http.post("/tokenize", json={"prompt": "he"}).status_code == 401
    with pytest.raises(httpx.ConnectError):  # the system CAs do not know ours
        httpx.get(f"{url}/health", timeout=TIMEOUT)
    for key, fine in ((KEY, True), ("wrong", False)):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                           http_client=httpx.Client(verify=ca, timeout=TIMEOUT)) as client:
            if fine:
                out = client.completions.create(model="tiny", prompt="he", max_tokens=2)
                assert out.usage.completion_tokens <= 2
            else:
                with pytest.raises(openai.AuthenticationError):
                    client.models.list()


def test_grpc_tls_and_key(secured, pki):
    insecure = grpc.insecure_channel(f"127.0.0.1:{secured.port}")
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(insecure).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS: no handshake
    insecure.close()
    channel = _secure_channel(secured, pki)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "tiny"
    calls = [
        lambda md: prediction.Predict(_predict_request(), timeout=TIMEOUT, metadata=md),
        lambda md: model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status, timeout=TIMEOUT, metadata=md),
        lambda md: list(generation_pb2_grpc.GenerationStub(channel).Generate(
            generation_pb2.GenerateRequest(
                text="he", sampling=generation_pb2.SamplingOptions(max_new_tokens=2)),
            timeout=TIMEOUT, metadata=md)),
    ]
    for call in calls:
        for metadata in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as info:
                call(metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call([("authorization", f"Bearer {KEY}")])
    channel.close()


def test_keras_llm_client_over_tls_with_a_key(secured, pki, capsys):
    from keras_llm import cli
    from keras_llm.serving.client import Client

    target = f"localhost:{secured.port}"
    ca = (pki / "ca.pem").read_bytes()
    with Client(target, timeout=TIMEOUT, api_key=KEY, root_certificates=ca) as client:
        assert client.generate("he", max_new_tokens=3, ignore_eos=True).generated_tokens == 3
        assert client.predict("tiny", ["he"])["num_tokens"][0] == 4
    with Client(target, timeout=TIMEOUT, root_certificates=ca) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("he", max_new_tokens=3)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cli.main(["client", "--target", target, "--ca_cert", str(pki / "ca.pem"),
                     "--api_key", KEY, "--prompt", "he", "--max-new-tokens", "3",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("stop", "length")
    assert cli.main(["client", "--target", target, "--ca_cert", str(pki / "ca.pem"),
                     "--prompt", "he"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_client_verify_refuses_clients_without_a_certificate(export_dir, pki, tmp_path):
    srv = _server(export_dir, _ssl_config_file(pki, tmp_path / "ssl.config", True))
    try:
        url = f"https://localhost:{srv.rest_api_port}/v1/models/tiny"
        ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=ca, timeout=TIMEOUT)
        ca.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert httpx.get(url, verify=ca, timeout=TIMEOUT).status_code == 200
        without = _secure_channel(srv, pki)
        with pytest.raises(grpc.RpcError) as info:
            prediction_service_pb2_grpc.PredictionServiceStub(without).Predict(
                _predict_request(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        without.close()
        with_cert = _secure_channel(srv, pki, client_cert=True)
        out = prediction_service_pb2_grpc.PredictionServiceStub(with_cert).Predict(
            _predict_request(), timeout=TIMEOUT)
        assert tf.make_ndarray(out.outputs["num_tokens"])[0] == 4
        with_cert.close()
    finally:
        srv.drain(0)


def test_port_in_use_is_refused(secured, export_dir):
    with pytest.raises((OSError, RuntimeError)):
        Server({"tiny": str(export_dir)}, port=secured.port, poll_seconds=0,
               engine_config=EngineConfig(max_slots=1, max_length=64, prompt_bucket=16))
    with pytest.raises(OSError):
        Server({"tiny": str(export_dir)}, port=0, rest_api_port=secured.rest_api_port,
               poll_seconds=0,
               engine_config=EngineConfig(max_slots=1, max_length=64, prompt_bucket=16))
