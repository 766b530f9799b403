"""Server lifecycle on loopback: new versions under load, several models, SIGTERM."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, model_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from benchmarks.bench_serving import start_server
from keras_llm.export.saved_model import export_model
from keras_llm.serving.client import Client
from keras_llm.serving.engine import EngineConfig
from keras_llm.serving.server import Server
from tests.helpers import REPO, free_ports, tiny_language_model


def tiny_lm(seed):
    return tiny_language_model(seed=seed, merges=["h e"], source=f"tiny-{seed}")


def test_new_version_under_load_fails_no_request(tmp_path):
    first, second = tiny_lm(1), tiny_lm(2)
    export_model(first, tmp_path, "m", max_new_tokens=8, progress=False)
    config = EngineConfig(max_slots=4, max_queue=64, max_length=64, prompt_bucket=16)
    server = Server({"m": str(tmp_path / "m")}, port=0, engine_config=config, poll_seconds=0.2)
    target = f"127.0.0.1:{server.port}"
    stop = threading.Event()
    failures, answers = [], []

    def load():
        with Client(target, timeout=120) as client:
            while not stop.is_set():
                try:
                    answers.append(list(client.generate("he", max_new_tokens=6,
                                                        ignore_eos=True).token_ids))
                except grpc.RpcError as error:
                    failures.append(error.code())

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(load) for _ in range(4)]
            time.sleep(1.0)
            export_model(second, tmp_path, "m", max_new_tokens=8, progress=False)
            deadline = time.time() + 120
            while server.servables.lookup("m").version != 2 and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            stop.set()
            for w in workers:
                w.result()
        assert server.servables.lookup("m").version == 2
        assert failures == []
        old = first.generate("he", max_new_tokens=6, stop_ids=()).token_ids
        new = second.generate("he", max_new_tokens=6, stop_ids=()).token_ids
        assert old != new
        assert set(map(tuple, answers)) <= {tuple(old), tuple(new)}
        assert answers[-1] == new and old in answers
    finally:
        stop.set()
        server.drain(0)


def test_model_config_file_serves_several_models(tmp_path):
    export_model(tiny_lm(1), tmp_path, "a", max_new_tokens=4, progress=False)
    export_model(tiny_lm(2), tmp_path, "b", max_new_tokens=4, progress=False)
    config_path = tmp_path / "models.config"
    config_path.write_text(
        "model_config_list {\n"
        f'  config {{ name: "a" base_path: "{tmp_path / "a"}" model_platform: "tensorflow" }}\n'
        f'  config {{ name: "b" base_path: "{tmp_path / "b"}" model_platform: "tensorflow" }}\n'
        "}\n")
    from keras_llm.serving.server import read_model_config
    models = read_model_config(str(config_path))
    assert {name: spec.base_path for name, spec in models.items()} == {
        "a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    assert all(spec.policy == "latest" and spec.num_versions == 1 for spec in models.values())
    server = Server(models, port=0, engine_config=EngineConfig(max_slots=2, max_length=64,
                                                               prompt_bucket=16), poll_seconds=0)
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            a = client.generate("he", model_name="a", max_new_tokens=4, ignore_eos=True)
            b = client.generate("he", model_name="b", max_new_tokens=4, ignore_eos=True)
            assert list(a.token_ids) != list(b.token_ids)
            assert client.predict("b", ["he"])["num_tokens"].shape == (1,)
    finally:
        server.drain(0)


def test_sigterm_drains_running_requests(tmp_path):
    export_model(tiny_lm(3), tmp_path, "m", max_new_tokens=8, progress=False)
    port, profiler_port = free_ports(2)
    proc = start_server(str(tmp_path), "m", port, 2, 256, ("--profiler_port", str(profiler_port)))
    try:
        # TensorBoard's Profile tab can reach the profiler server.
        socket.create_connection(("127.0.0.1", profiler_port), timeout=10).close()
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            responses = client.stream_responses("he", max_new_tokens=150, ignore_eos=True)
            next(responses)  # the request is running
            proc.send_signal(signal.SIGTERM)
            summary = [r for r in responses if r.HasField("summary")][0].summary
            assert summary.generated_tokens == 150 and summary.finish_reason == "length"
        assert proc.wait(timeout=120) == 0
        logs = proc.stderr.read()
        assert '"event": "stopped"' in logs and '"event": "request"' in logs
    finally:
        if proc.poll() is None:
            proc.kill()


def _tensorflow_loaded(pid):
    with open(f"/proc/{pid}/maps", encoding="utf-8") as maps:
        return "_pywrap_tensorflow_internal" in maps.read()


def test_a_litert_server_loads_tensorflow_only_for_the_savedmodels_own_signatures(tmp_path):
    # A default export decodes with LiteRT: generation, Predict on the
    # generation signatures, metadata and status need no TensorFlow (590 MB
    # and 3 s to import); `score` runs the SavedModel and loads it then.
    lm = tiny_lm(5)
    export_model(lm, tmp_path, "m", max_new_tokens=8, progress=False)
    port = free_ports(1)[0]
    proc = start_server(str(tmp_path), "m", port, 2, 256)
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            expected = lm.generate("hello", max_new_tokens=6, stop_ids=()).token_ids
            summary = client.generate("hello", max_new_tokens=6, ignore_eos=True)
            assert list(summary.token_ids) == list(expected)
            out = client.predict("m", ["hello"], signature_name="generate",
                                 max_new_tokens=np.array([6], np.int32),
                                 temperature=np.zeros([1], np.float32),
                                 top_p=np.ones([1], np.float32), top_k=np.zeros([1], np.int32),
                                 seed=np.zeros([1], np.int32))
            assert out["num_tokens"][0] >= 1
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            metadata = stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=model_pb2.ModelSpec(name="m"), metadata_field=["signature_def"]),
                timeout=60)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            metadata.metadata["signature_def"].Unpack(signatures)
            assert {"generate", "score"} <= set(signatures.signature_def)
            assert not _tensorflow_loaded(proc.pid)
            ids = np.array([lm.tokenizer.encode("hello there")], np.int32)
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
                name="m", signature_name="score"))
            request.inputs["token_ids"].CopyFrom(tf.make_tensor_proto(ids))
            request.inputs["num_tokens"].CopyFrom(tf.make_tensor_proto(
                np.array([ids.shape[1]], np.int32)))
            scored = {k: tf.make_ndarray(v) for k, v in
                      stub.Predict(request, timeout=120).outputs.items()}
            logits = lm.model(ids).numpy()[0]
            shifted = logits - logits.max(-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            want = [log_probs[i, ids[0, i + 1]] for i in range(ids.shape[1] - 1)]
            np.testing.assert_allclose(scored["total_log_prob"][0], sum(want), atol=1e-3)
            assert _tensorflow_loaded(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_sixteen_concurrent_streams_equal_alone(tmp_path):
    lm = tiny_lm(7)
    export_model(lm, tmp_path, "m", max_new_tokens=12, progress=False)
    config = EngineConfig(max_slots=16, max_queue=16, max_length=64, prompt_bucket=16)
    server = Server({"m": str(tmp_path / "m")}, port=0, engine_config=config, poll_seconds=0)
    prompts = [f"stream {i} " + "h" * (i % 5) for i in range(16)]
    try:
        def one(prompt):
            with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
                return list(client.generate(prompt, max_new_tokens=12).token_ids)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(one, prompts))
        alone = [one(p) for p in prompts]
        assert together == alone
        assert together == [lm.generate(p, max_new_tokens=12).token_ids for p in prompts]
    finally:
        server.drain(0)


def test_every_export_kind_serves_with_default_flags(tmp_path):
    """Default export, --litert int8, int4 and float32, and --no-xla, each
    served with keras-llm serve's default engine settings (no max_length
    given: the default is above what the LiteRT files hold)."""
    import json as json_lib

    from keras_llm.serving.engine import EngineConfig as Defaults

    lm = tiny_language_model(seed=4, merges=["h e"])
    kinds = {"default": {}, "int8": {"litert": "int8"}, "int4": {"litert": "int4"},
             "float32": {"litert": "float32"},
             "no-xla": {"jit_compile": False, "litert": None}}
    for name, options in kinds.items():
        export_model(lm, tmp_path, name, max_new_tokens=8, progress=False, **options)
    server = Server({name: str(tmp_path / name) for name in kinds}, port=0,
                    engine_config=Defaults(), poll_seconds=0)
    try:
        target = f"127.0.0.1:{server.port}"
        expected = lm.generate("hello", max_new_tokens=6, stop_ids=()).token_ids
        with Client(target, timeout=120) as client:
            for name in kinds:
                model = server.servables.lookup(name)
                backend = model.engine.engine.backend.capabilities
                meta = model.engine.metadata
                assert backend.name == ("xla" if name == "no-xla" else "litert"), name
                assert json_lib.dumps({"slots": model.engine.num_slots})  # plain ints
                summary = client.generate("hello", model_name=name, max_new_tokens=6,
                                          ignore_eos=True)
                assert summary.generated_tokens == 6, name
                if name not in ("int8", "int4"):  # float32 elsewhere: the same tokens
                    assert list(summary.token_ids) == expected, name
                out = client.predict(name, ["hello"])
                assert out["num_tokens"][0] >= 1 and out["text"].shape == (1,), name
                assert meta["xla"] == (name != "no-xla")
    finally:
        server.drain(0)


def test_corrupt_version_never_serves_and_resource_transition(tmp_path):
    """A corrupt version fails to load and the serving one stays (it comes
    back after a resource transition retired it first); a good new version
    then replaces it, one version in memory at a time."""
    import shutil

    export_model(tiny_lm(5), tmp_path, "m", max_new_tokens=4, progress=False)
    server = Server({"m": str(tmp_path / "m")}, port=0, poll_seconds=0.2,
                    version_transition="resource",
                    engine_config=EngineConfig(max_slots=2, max_length=64, prompt_bucket=16))
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            expected = list(client.generate("he", max_new_tokens=4, ignore_eos=True).token_ids)
            corrupt = tmp_path / "m" / "2"
            corrupt.mkdir()
            (corrupt / "saved_model.pb").write_bytes(b"not a SavedModel")
            deadline = time.time() + 60
            retries = server.manager._retry  # pylint: disable=protected-access
            while ("m", 2) not in retries and time.time() < deadline:
                time.sleep(0.1)
            assert ("m", 2) in retries  # its load failed and waits for a retry
            while server.servables.lookup("m") is None and time.time() < deadline:
                time.sleep(0.1)  # the retired version 1 being loaded again
            assert server.servables.lookup("m").version == 1
            assert list(client.generate("he", max_new_tokens=4,
                                        ignore_eos=True).token_ids) == expected
            shutil.rmtree(corrupt)
            shutil.copytree(tmp_path / "m" / "1", tmp_path / "m" / "3")
            while (getattr(server.servables.lookup("m"), "version", None) != 3
                   and time.time() < deadline + 60):
                time.sleep(0.1)
            assert sorted(server.servables.versions["m"]) == [3]
            assert list(client.generate("he", max_new_tokens=4,
                                        ignore_eos=True).token_ids) == expected
    finally:
        server.drain(0)


def test_model_paths_outside_the_allowed_root_are_refused(tmp_path):
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    root = tmp_path / "root"
    export_model(tiny_lm(6), root, "m", max_new_tokens=2, progress=False)
    config = EngineConfig(max_slots=1, max_length=64, prompt_bucket=16)
    with pytest.raises(ValueError, match="outside the allowed root"):
        Server({"m": str(root / ".." / "elsewhere")}, port=0, poll_seconds=0,
               engine_config=config, allowed_model_root=str(root))
    server = Server({"m": str(root / "m")}, port=0, poll_seconds=0, engine_config=config,
                    allowed_model_root=str(root))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        reload = model_management_pb2.ReloadConfigRequest()
        entry = reload.config.model_config_list.config.add()
        entry.name, entry.base_path = "m", str(root / "m" / ".." / ".." / "etc")
        answer = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            reload, timeout=60)
        assert answer.status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "outside the allowed root" in answer.status.error_message
        assert server.servables.lookup("m").version == 1  # still serving
        channel.close()
    finally:
        server.drain(0)


def test_missing_model_config_file_keeps_the_server_up_until_it_reads(tmp_path):
    """As TF Serving: a config file that does not exist (or does not parse)
    yet is logged, health says NOT_SERVING, and the models serve once it reads."""
    import httpx

    config_path = tmp_path / "models.config"
    port, rest = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_llm.cli", "serve", f"--port={port}",
         f"--rest_api_port={rest}", f"--model_config_file={config_path}",
         "--model_config_file_poll_wait_seconds=0.5", "--max_slots=1", "--max_length=64"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving no models yet" in proc.stdout.readline()
        url = f"http://127.0.0.1:{rest}/health"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                assert httpx.get(url, timeout=5).status_code == 503
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        config_path.write_text("model_config_list { config { name: ")  # half-written
        time.sleep(1.5)
        assert proc.poll() is None and httpx.get(url, timeout=5).status_code == 503
        export_model(tiny_lm(7), tmp_path, "m", max_new_tokens=4, progress=False)
        config_path.write_text(
            f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path / "m"}" }} }}\n')
        while httpx.get(url, timeout=5).status_code != 200 and time.time() < deadline:
            time.sleep(0.2)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            answer = client.generate("he", model_name="m", max_new_tokens=4, ignore_eos=True)
        assert list(answer.token_ids) == tiny_lm(7).generate(
            "he", max_new_tokens=4, stop_ids=()).token_ids
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10).status
        channel.close()
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "No such file" in err  # the start-up warning says why
    assert '"event": "config_reload_failed"' in err  # the half-written file, logged


def test_half_written_version_is_retried_and_serves_once_complete(tmp_path):
    """A version directory still being copied (no variables yet) fails to load
    and is retried with backoff while the serving version keeps answering;
    complete, it replaces it."""
    import shutil

    export_model(tiny_lm(8), tmp_path / "a", "m", max_new_tokens=4, progress=False)
    export_model(tiny_lm(9), tmp_path / "b", "m", max_new_tokens=4, progress=False)
    base = tmp_path / "a" / "m"
    server = Server({"m": str(base)}, port=0, poll_seconds=0.2,
                    engine_config=EngineConfig(max_slots=2, max_length=64, prompt_bucket=16))
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            first = list(client.generate("he", max_new_tokens=4, ignore_eos=True).token_ids)
            partial = base / "2"
            partial.mkdir()
            shutil.copy(tmp_path / "b" / "m" / "1" / "saved_model.pb", partial)
            deadline = time.time() + 60
            retries = server.manager._retry  # pylint: disable=protected-access
            while ("m", 2) not in retries and time.time() < deadline:
                time.sleep(0.1)
            assert ("m", 2) in retries
            assert server.servables.lookup("m").version == 1
            assert list(client.generate("he", max_new_tokens=4,
                                        ignore_eos=True).token_ids) == first
            for entry in (tmp_path / "b" / "m" / "1").iterdir():
                if entry.name != "saved_model.pb":
                    (shutil.copytree if entry.is_dir() else shutil.copy)(
                        entry, partial / entry.name)
            while server.servables.lookup("m").version != 2 and time.time() < deadline + 60:
                time.sleep(0.1)
            assert server.servables.lookup("m").version == 2
            second = list(client.generate("he", max_new_tokens=4, ignore_eos=True).token_ids)
            assert second == tiny_lm(9).generate("he", max_new_tokens=4,
                                                 stop_ids=()).token_ids != first
    finally:
        server.drain(0)


def test_reload_over_the_memory_budget_retires_first_and_fails_no_request(tmp_path, caplog):
    """A new version that would not fit beside the old one in the memory
    budget replaces it (resource transition, one version in memory) while
    gRPC Generate, gRPC Predict and HTTP requests keep coming: they wait for
    the new version, and none fails."""
    import httpx

    caplog.set_level("INFO", logger="keras_llm")
    first, second = tiny_lm(10), tiny_lm(11)
    export_model(first, tmp_path, "m", max_new_tokens=4, progress=False)
    config = EngineConfig(max_slots=2, max_queue=16, max_length=64, prompt_bucket=16)
    server = Server({"m": str(tmp_path / "m")}, port=0, engine_config=config, poll_seconds=0.2,
                    rest_api_port=0, memory_budget_bytes=1)  # nothing fits beside
    target, url = f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.rest_api_port}"
    stop = threading.Event()
    failures, answers = [], []

    def grpc_load(kind):
        with Client(target, timeout=120) as client:
            while not stop.is_set():
                try:
                    if kind == "generate":
                        answers.append(tuple(client.generate(
                            "he", max_new_tokens=4, ignore_eos=True).token_ids))
                    else:
                        client.predict("m", ["he"])
                except grpc.RpcError as error:
                    failures.append((kind, error.code()))

    def http_load():
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                reply = http.post(f"{url}/v1/completions", json={
                    "model": "m", "prompt": "he", "max_tokens": 4, "ignore_eos": True})
                if reply.status_code != 200:
                    failures.append(("http", reply.status_code, reply.text))

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(grpc_load, "generate"), pool.submit(grpc_load, "generate"),
                       pool.submit(grpc_load, "predict"), pool.submit(http_load)]
            time.sleep(1.0)
            export_model(second, tmp_path, "m", max_new_tokens=4, progress=False)
            deadline = time.time() + 120
            while (getattr(server.servables.lookup("m"), "version", None) != 2
                   and time.time() < deadline):
                time.sleep(0.1)
            time.sleep(1.0)
            stop.set()
            for w in workers:
                w.result()
        assert sorted(server.servables.versions["m"]) == [2]
        assert failures == []
        events = [json.loads(r.getMessage())["event"] for r in caplog.records
                  if r.getMessage().startswith("{")]
        transition = events[events.index("version_transition_resource"):]
        assert transition.index("model_retired") < transition.index("model_loaded")
        old = tuple(first.generate("he", max_new_tokens=4, stop_ids=()).token_ids)
        new = tuple(second.generate("he", max_new_tokens=4, stop_ids=()).token_ids)
        assert old in answers and answers[-1] == new
    finally:
        stop.set()
        server.drain(0)


ARENAS = """
import ctypes, sys, threading
from keras_llm.serving.server import limit_malloc_arenas
print(limit_malloc_arenas())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
together = threading.Barrier(6)  # all alive at once: an exited thread's arena is reused


def allocate():
    libc.malloc(4096)
    together.wait()


threads = [threading.Thread(target=allocate) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.fopen.restype = ctypes.c_void_p
out = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fclose(ctypes.c_void_p(out))
"""


@pytest.mark.parametrize("preset", [None, "4"])
def test_the_server_shares_two_malloc_arenas_between_its_threads(preset, tmp_path):
    """`keras-llm serve` lets its threads share two malloc arenas (glibc
    gives each new thread its own otherwise, each keeping its freed pages);
    a MALLOC_ARENA_MAX the user set stands."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if preset:
        env["MALLOC_ARENA_MAX"] = preset
    info = tmp_path / "malloc_info.xml"
    out = subprocess.run([sys.executable, "-c", ARENAS, str(info)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    heaps = info.read_text().count("<heap nr=")
    if preset:
        assert out.split()[-1] == "False" and 2 < heaps <= 4
    else:
        assert out.split()[-1] == "True" and heaps <= 2
