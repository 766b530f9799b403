"""Two `keras-llm serve` replicas on loopback behind the balancing client: the
load spreads over both, one is SIGKILLed mid-load, and no request fails."""

import concurrent.futures
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from keras_llm.export.saved_model import export_model
from keras_llm.serving.client import Client
from keras_llm.serving.engine import EngineConfig
from keras_llm.serving.server import Server
from tests.helpers import REPO
from tests.test_http_security import _ssl_config_file, pki  # noqa: F401  pylint: disable=unused-import
from tests.helpers import free_ports
from tests.test_serving_lifecycle import tiny_lm

NEW = 6  # new tokens of the short requests (and the export's, for Predict)
LONG = 200  # of the streams open while the replica dies
PROMPTS = [f"replica {i} " + "he" * (i % 3) for i in range(6)] + ["hello", "the", "ll he"]
KINDS = ("generate", "stream", "predict")


class Replica:
    """One `keras-llm serve` subprocess; its log goes to a file (a full pipe
    would stall it)."""

    def __init__(self, model_path, log_path):
        self.port, self.metrics_port = free_ports(2)
        self.log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "keras_llm.cli", "serve", "--port", str(self.port),
             "--metrics_port", str(self.metrics_port), "--model_name", "m",
             "--model_base_path", str(model_path), "--max_slots", "4", "--max_queue", "64",
             "--max_length", "256", "--file_system_poll_wait_seconds", "0"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{self.port}"

    def wait_serving(self, deadline):
        with Client(self.target, timeout=2) as client:
            while time.time() < deadline:
                assert self.proc.poll() is None, open(self.log.name, encoding="utf-8").read()[-3000:]
                try:
                    if client.health() == "SERVING":
                        return
                except grpc.RpcError:
                    time.sleep(0.3)
        raise AssertionError(f"{self.target} is not serving")

    def requests_total(self):
        """Finished generation requests (`keras_llm_requests_total`, every label)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(float(v) for v in re.findall(r"^keras_llm_requests_total\{.*\} (\S+)$",
                                                text, re.M))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


def answer(client, kind, prompt):
    """(token ids, text) of one request of `kind`."""
    if kind == "predict":
        out = client.predict("m", [prompt])
        return list(out["token_ids"][0, :out["num_tokens"][0]]), out["text"][0].decode()
    if kind == "generate":
        summary = client.generate(prompt, max_new_tokens=NEW)
        return list(summary.token_ids), summary.text
    ids, text = [], ""
    for response in client.stream_responses(prompt, max_new_tokens=NEW):
        ids += response.delta.token_ids
        text += response.delta.text
    return ids, text


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("replicas")
    export_model(tiny_lm(11), base, "m", max_new_tokens=NEW, progress=False,
                 jit_compile=False, litert=None)  # slow enough decoding to kill a replica mid-stream
    return base / "m"


def test_balanced_client_survives_a_replica_killed_under_load(model_path, tmp_path):  # pylint: disable=redefined-outer-name
    replicas = [Replica(model_path, tmp_path / f"replica{i}.log") for i in range(2)]
    pool = concurrent.futures.ThreadPoolExecutor(6)
    try:
        for replica in replicas:
            replica.wait_serving(time.time() + 120)
        with Client(replicas[0].target, timeout=60) as alone:
            expected = {(kind, p): answer(alone, kind, p) for kind in KINDS for p in PROMPTS}
            long_summary = alone.generate("the", max_new_tokens=LONG, ignore_eos=True)
        assert long_summary.generated_tokens == LONG
        before = [r.requests_total() for r in replicas]
        jobs = [(KINDS[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(36)]
        failures = []

        def run(job):
            try:
                return job, answer(client, *job)
            except grpc.RpcError as error:
                failures.append((job, error))
                return job, None

        with Client([r.target for r in replicas], timeout=60) as client:
            done = list(pool.map(run, jobs[:18]))
            served = [r.requests_total() - b for r, b in zip(replicas, before)]
            assert all(n > 0 for n in served), served  # Generate calls reached both

            # Four streams started one after the other: round robin puts two on
            # each replica. Then more load, and one replica dies under it.
            streams = [client.stream_responses("the", max_new_tokens=LONG, ignore_eos=True)
                       for _ in range(4)]
            heads = [next(s) for s in streams]
            later = [pool.submit(run, job) for job in jobs[18:]]
            replicas[1].kill()
            long_answers = []
            for head, rest in zip(heads, streams):
                deltas = [head.delta] + [r.delta for r in rest if r.HasField("delta")]
                long_answers.append(([t for d in deltas for t in d.token_ids],
                                     "".join(d.text for d in deltas)))
            done += [f.result() for f in later]
            reissued, resumed = client.reissued, client.resumed

        assert failures == []
        assert [a for _, a in done] == [expected[job] for job, _ in done]
        assert long_answers == [(list(long_summary.token_ids), long_summary.text)] * 4
        assert resumed >= 2  # the long streams on the dead replica went on from where they were
        print(f"Generate calls per replica before the kill: {served}; calls re-issued: "
              f"{reissued}, of which streams resumed: {resumed}; failed: {len(failures)}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for replica in replicas:
            replica.kill()


def test_tls_and_api_key_across_replicas(pki, model_path, tmp_path):  # pylint: disable=redefined-outer-name
    """Several `localhost` targets over TLS: each replica's certificate is
    checked against the name given, and both answer."""
    ssl_config = _ssl_config_file(pki, tmp_path / "ssl.config", False)
    servers = [Server({"m": str(model_path)}, port=0, poll_seconds=0, ssl_config=ssl_config,
                      api_key="k", engine_config=EngineConfig(max_slots=2, max_length=64,
                                                              prompt_bucket=16))
               for _ in range(2)]
    try:
        targets = ",".join(f"localhost:{s.port}" for s in servers)
        with Client(targets, timeout=60, api_key="k",
                    root_certificates=(pki / "ca.pem").read_bytes()) as client:
            answers = {tuple(client.generate("he", max_new_tokens=3, ignore_eos=True).token_ids)
                       for _ in range(6)}
        assert len(answers) == 1
        served = [s.metrics.registry.get_sample_value(
            "keras_llm_requests_total", {"model": "m", "finish_reason": "length"}) for s in servers]
        assert sum(served) == 6 and min(served) >= 1, served  # the first calls may find one ready
    finally:
        for server in servers:
            server.drain(0)


def test_a_replayed_stream_gives_only_what_is_new():
    from keras_llm.serving.client import StreamInterrupted, _Delivered
    from keras_llm.serving.protos.generation_pb2 import Delta

    delivered = _Delivered()
    assert delivered.fresh(0, 0, Delta(text="ab", token_ids=[1, 2])) == ([1, 2], "ab")
    assert delivered.fresh(2, 2, Delta(text="", token_ids=[3])) == ([3], "")  # half a character
    # The replay cuts its deltas elsewhere: only the part past what was given comes out.
    assert delivered.fresh(0, 0, Delta(text="a", token_ids=[1])) == ([], "")
    assert delivered.fresh(1, 1, Delta(text="bcé", token_ids=[2, 3, 4])) == ([4], "cé")
    with pytest.raises(StreamInterrupted):
        delivered.fresh(0, 0, Delta(text="x", token_ids=[9]))


def test_targets():
    from keras_llm.serving.client import channel_target

    assert channel_target("127.0.0.1:8500") == ("127.0.0.1:8500", None)
    for given in ("dns:///keras-llm.ns.svc.cluster.local:8500", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert channel_target(given) == (given, None)
    assert channel_target("localhost:1, 10.0.0.2:2") == ("ipv4:127.0.0.1:1,10.0.0.2:2",
                                                         "localhost:1")
    assert channel_target(["[::1]:1", "[fe80::2]:2"])[0] == "ipv6:[::1]:1,[fe80::2]:2"
    with pytest.raises(ValueError):
        channel_target(["127.0.0.1:1", "[::1]:2"])
