"""Multi-worker training: `keras-llm optimize --strategy multi_worker` run by
two worker processes on loopback (MultiWorkerMirroredStrategy, gRPC
collectives on the CPU), against the same command on one worker.

- Two workers with the same global batch follow the one-worker loss curve
  step by step, end with the same weights on both workers (and as one
  worker), and leave one model, one report and one set of TensorBoard
  scalars on disk (the chief's).
- A worker SIGKILLed mid-run: the survivor cannot go on without it and exits
  with an error by itself; both are restarted with the same command (what a
  cluster manager does) and training resumes from the backup, not from step
  0, and ends with the weights of the uninterrupted run.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import keras_llm
from keras_llm import cli, saving
from keras_llm.optimize import teacher_text
from keras_llm.optimize.strategy import cluster_from_env, training_strategy
from tests.helpers import REPO, byte_level_tokenizer, free_ports, tiny_model

STEPS = 16
TRAIN_TOKENS = 640
KILL_AT = 3  # SIGKILL worker 1 once it logged this step
TIMEOUT = 300  # seconds, for every process


def _optimize_args(model_dir, run_dir):
    return [sys.executable, "-m", "keras_llm.cli", "optimize", "--model", model_dir,
            "--output", str(run_dir / "out"), "--report", str(run_dir / "report.json"),
            "--prune", "0.5", "--calibration-sequences", "4", "--recovery-steps", str(STEPS),
            "--train-tokens", str(TRAIN_TOKENS), "--eval-tokens", "64", "--no-speed",
            "--batch-size", "4", "--sequence-length", "16", "--logdir", str(run_dir / "logs"),
            "--backup-every", "1"]


class _Cluster:
    """Worker processes of one test; every one is killed at the end."""

    def __init__(self):
        self.processes = []

    def start(self, args, run_dir, name, tf_config=None):
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_USE_LEGACY_KERAS": "1"}
        env.pop("TF_CONFIG", None)
        if tf_config is not None:
            env["TF_CONFIG"] = json.dumps(tf_config)
        err = run_dir / f"{name}.err"
        with open(run_dir / f"{name}.out", "w") as out, open(err, "w") as log:
            process = subprocess.Popen(args + (["--strategy", "multi_worker"] if tf_config
                                               else []),
                                       stdout=out, stderr=log, env=env, cwd=str(run_dir))
        process.log = err
        self.processes.append(process)
        return process

    def workers(self, args, run_dir, prefix):
        ports = free_ports(2)
        cluster = {"worker": [f"localhost:{port}" for port in ports]}
        return [self.start(args, run_dir, f"{prefix}{i}",
                           {"cluster": cluster, "task": {"type": "worker", "index": i}})
                for i in range(2)]

    @staticmethod
    def wait(process, timeout=TIMEOUT):
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"{process.log.name} did not finish in {timeout}s:\n{_tail(process)}")

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def _tail(process):
    return "\n".join(line for line in process.log.read_text().splitlines()
                     if line.startswith(("[optimize]", "keras-llm", "Traceback")))[-3000:]


def _progress_steps(process):
    return [int(m) for m in re.findall(r"recovery step (\d+)/", process.log.read_text())]


def _step_losses(logdir):
    """{step: loss} from the TensorBoard scalars of the recovery fine-tune
    (a later event file, written after a restart, wins)."""
    losses = {}
    for path in sorted(glob.glob(os.path.join(logdir, "recovery", "events.out.tfevents.*")),
                       key=os.path.getmtime):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


def _weights(model_dir):
    return keras_llm.load(str(model_dir), progress=False).model.get_weights()


def _digests(process):
    return re.findall(r"trained weights sha1 (\w+)", process.log.read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    directory = base / "tiny"
    tokenizer = byte_level_tokenizer(["h e", "l l", "he ll", "t h", "th e"])
    saving.save_model_dir(directory, tiny_model(seed=3, vocabulary_size=tokenizer.vocabulary_size),
                          tokenizer, {"source": "test", "architecture": "llama"})
    # The teacher text every run trains on, generated once here and put in
    # each run's logdir cache (each process would otherwise generate it).
    teacher_text.teacher_token_stream(keras_llm.load(str(directory), progress=False),
                                      TRAIN_TOKENS, cache_dir=str(base / "teacher_text"),
                                      verbose=False)
    return str(directory)


def _run_dir(tmp_path_factory, model_dir, name):
    run_dir = tmp_path_factory.mktemp(name)
    shutil.copytree(os.path.join(os.path.dirname(model_dir), "teacher_text"),
                    run_dir / "logs" / "teacher_text")
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    """One worker (--strategy auto) and two workers, run at the same time."""
    one = _run_dir(tmp_path_factory, model_dir, "one-worker")
    two = _run_dir(tmp_path_factory, model_dir, "two-workers")
    cluster = _Cluster()
    try:
        started = time.perf_counter()
        single = cluster.start(_optimize_args(model_dir, one), one, "single")
        workers = cluster.workers(_optimize_args(model_dir, two), two, "worker")
        for process in [single, *workers]:
            assert cluster.wait(process) == 0, _tail(process)
        return {"one": one, "two": two, "workers": workers,
                "seconds": time.perf_counter() - started}
    finally:
        cluster.close()


def test_two_workers_follow_the_one_worker_loss_curve_and_hold_the_same_weights(uninterrupted):
    one, two, workers = uninterrupted["one"], uninterrupted["two"], uninterrupted["workers"]
    # Same examples per step: the per-step losses of the global batch agree.
    single_losses, shared_losses = _step_losses(one / "logs"), _step_losses(two / "logs")
    assert sorted(single_losses) == sorted(shared_losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([shared_losses[s] for s in range(1, STEPS + 1)],
                               [single_losses[s] for s in range(1, STEPS + 1)], rtol=1e-4)
    # Both workers trained the same weights, bit for bit, and the chief's
    # output holds the one-worker weights.
    digests = [_digests(worker) for worker in workers]
    assert len(digests[0]) == 1 and digests[0] == digests[1]
    for shared, single in zip(_weights(two / "out"), _weights(one / "out")):
        np.testing.assert_allclose(shared, single, rtol=1e-4, atol=1e-6)
    report = json.load(open(two / "report.json"))
    assert report["strategy"] == "MultiWorkerMirroredStrategy (2 replica(s) on 2 worker(s))"
    assert report["details"]["pruning"]["resumed_from"] == 0
    assert "not the chief, nothing published" in workers[1].log.read_text()
    # One model, one report, one set of scalars (the chief's), no backup left.
    assert sorted(os.listdir(two)) == sorted(["out", "report.json", "report.md", "logs",
                                              "worker0.err", "worker0.out", "worker1.err",
                                              "worker1.out"])
    assert sorted(os.listdir(two / "logs")) == ["recovery", "teacher_text"]
    assert len(os.listdir(two / "logs" / "recovery")) == 1


def test_a_killed_worker_is_restarted_and_training_resumes_from_the_backup(
        uninterrupted, tmp_path_factory, model_dir):
    run_dir = _run_dir(tmp_path_factory, model_dir, "restarted")
    args = _optimize_args(model_dir, run_dir)
    cluster = _Cluster()
    try:
        chief, worker = cluster.workers(args, run_dir, "first")
        deadline = time.monotonic() + TIMEOUT
        while KILL_AT not in _progress_steps(worker):
            assert worker.poll() is None and chief.poll() is None, _tail(worker) + _tail(chief)
            assert time.monotonic() < deadline, "worker 1 never reached step " + str(KILL_AT)
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        # MultiWorkerMirroredStrategy cannot go on without a peer: the chief
        # stops by itself once the coordination service misses the dead
        # worker's heartbeats.
        assert cluster.wait(chief) != 0
        assert "lost a worker of the cluster" in chief.log.read_text(), _tail(chief)
        assert max(_progress_steps(chief)) < STEPS
        backup = run_dir / "logs" / "backup" / "recovery" / "chief"
        assert any(name.endswith(".index") for name in os.listdir(backup))
        assert not (run_dir / "out").exists() and not (run_dir / "report.json").exists()

        # What a cluster manager does: start every worker again, same command.
        restarted = cluster.workers(args, run_dir, "second")
        for process in restarted:
            assert cluster.wait(process) == 0, _tail(process)
    finally:
        cluster.close()
    resumed = [int(m) for m in re.findall(r"resuming from the backup at step (\d+)/",
                                          restarted[0].log.read_text())]
    assert len(resumed) == 1 and KILL_AT - 1 <= resumed[0] < STEPS
    assert _progress_steps(restarted[0])[0] == resumed[0] + 1 > 1
    report = json.load(open(run_dir / "report.json"))
    assert report["details"]["pruning"]["resumed_from"] == resumed[0]
    # The resumed run ends where the uninterrupted one did.
    reference = uninterrupted["two"]
    assert len(_digests(restarted[0])) == 1 and _digests(restarted[0]) == _digests(restarted[1])
    losses, expected = _step_losses(run_dir / "logs"), _step_losses(reference / "logs")
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [expected[s] for s in sorted(losses)], rtol=1e-4)
    for got, want in zip(_weights(run_dir / "out"), _weights(reference / "out")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not (run_dir / "logs" / "backup").exists()  # removed once the run completed


@pytest.mark.parametrize("tf_config, message", [
    (None, "needs TF_CONFIG"),
    ("{not json", "not JSON"),
    ('{"cluster": {"worker": ["localhost:1"]}}', '"task" object'),
    ('{"cluster": {"ps": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}', "'ps' tasks"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 1}}',
     "task index 1"),
    ('{"cluster": {"worker": "localhost:1"}, "task": {"type": "worker", "index": 0}}',
     "list of"),
])
def test_multi_worker_needs_a_well_formed_tf_config(tf_config, message):
    environ = {} if tf_config is None else {"TF_CONFIG": tf_config}
    with pytest.raises(ValueError, match=re.escape(message)):
        cluster_from_env(environ)


def test_tf_config_is_read_and_cli_refuses_multi_worker_without_it(capsys, monkeypatch,
                                                                   tmp_path):
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    assert cluster_from_env({"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": 1}})}) == (cluster, "worker", 1)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = cli.main(["optimize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o"),
                     "--report", str(tmp_path / "r.json"), "--prune", "0.5",
                     "--strategy", "multi_worker"])
    err = capsys.readouterr().err
    assert code == 2 and "keras-llm: error: --strategy multi_worker needs TF_CONFIG" in err
    code = cli.main(["optimize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o"),
                     "--report", str(tmp_path / "r.json"), "--prune", "0.5",
                     "--strategy", "parameter_server"])
    assert code == 2 and "--strategy must be one of auto, mirrored, multi_worker" in \
        capsys.readouterr().err
    assert type(training_strategy(kind="mirrored")).__name__ == "MirroredStrategy"
