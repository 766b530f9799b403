"""The `tf.distribute` strategy training steps run under.

Recovery fine-tuning, QAT and distillation build their models and optimizers
inside `training_strategy().scope()`:

- "auto": every GPU of the machine (`MirroredStrategy`), or the default
  strategy on a CPU-only machine;
- "mirrored": `MirroredStrategy` on this machine's devices (one CPU replica
  when there is no GPU);
- "multi_worker": `MultiWorkerMirroredStrategy` over the cluster that the
  standard `TF_CONFIG` variable describes. Every worker runs the same
  command; gradients are all-reduced, so every worker holds the same weights.
  Only the chief (`is_chief`) writes files that outlive the run.

`MultiWorkerMirroredStrategy` configures this process's collective ops, which
TensorFlow only allows before it runs anything: create it first (the
pipeline and the CLI do). There is one per process, so it is made once and
returned again.

Example:
    >>> strategy = training_strategy(kind="multi_worker")  # TF_CONFIG set
    >>> with strategy.scope():
    ...     model.compile(...)
"""

import functools
import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multi_worker")
TASK_TYPES = ("chief", "worker")


def training_strategy(devices=None, kind="auto"):
    """The strategy for training steps.

    Args:
        devices: explicit device names, e.g. ["/cpu:0", "/cpu:1"] (tests);
            a `MirroredStrategy` over them.
        kind: "auto", "mirrored" or "multi_worker" (see the module docstring).
    """
    if kind not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {kind!r}")
    if kind == "multi_worker":
        if devices:
            raise ValueError("devices name one machine's devices; multi_worker reads "
                             "the cluster from TF_CONFIG")
        return _multi_worker_strategy()
    if devices:
        return tf.distribute.MirroredStrategy(list(devices))
    if kind == "mirrored" or tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def cluster_from_env(environ=None):
    """This task's cluster from `TF_CONFIG`.

    Returns:
        `(cluster, task_type, task_index)`: `cluster` maps "chief"/"worker"
        to lists of "host:port".

    Raises:
        ValueError: TF_CONFIG is missing, not JSON, or does not describe a
            chief/worker task of its own cluster.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    if not text:
        raise ValueError("--strategy multi_worker needs TF_CONFIG, e.g. "
                         '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not JSON: {error}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError('TF_CONFIG needs a "cluster" object and a "task" object')
    for name, addresses in cluster.items():
        if name not in TASK_TYPES:
            raise ValueError(f"TF_CONFIG cluster has {name!r} tasks; multi_worker runs "
                             f"{' and '.join(TASK_TYPES)} tasks only")
        if not isinstance(addresses, list) or not addresses \
                or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise ValueError(f'TF_CONFIG cluster "{name}" must be a list of "host:port"')
    if "worker" not in cluster and "chief" not in cluster:
        raise ValueError('TF_CONFIG cluster needs a "worker" list')
    if len(cluster.get("chief", [])) > 1:
        raise ValueError("TF_CONFIG cluster has more than one chief")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster:
        raise ValueError(f"TF_CONFIG task type {task_type!r} is not in the cluster "
                         f"({', '.join(cluster)})")
    if not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < len(cluster[task_type]):
        raise ValueError(f"TF_CONFIG task index {index!r} is not in 0.."
                         f"{len(cluster[task_type]) - 1} for {task_type!r}")
    return cluster, task_type, index


@functools.lru_cache(maxsize=1)
def _multi_worker_strategy():
    cluster_from_env()
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise RuntimeError(
            "--strategy multi_worker: the MultiWorkerMirroredStrategy must be created before "
            "TensorFlow runs anything in this process; call "
            "keras_llm.optimize.strategy.training_strategy(kind='multi_worker') before "
            "loading a model") from None


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) \
        and strategy.extended._in_multi_worker_mode()  # pylint: disable=protected-access


def is_chief(strategy):
    """True on the one worker that writes results: the "chief" task, or
    worker 0 when the cluster has no chief; always True on one machine."""
    return bool(strategy.extended.should_checkpoint)


def task_name(strategy):
    """"worker 1 of 2 (chief)" style, for logs; "" on one machine."""
    if not is_multi_worker(strategy):
        return ""
    resolver = strategy.cluster_resolver
    workers = sum(len(v) for v in resolver.cluster_spec().as_dict().values())
    return (f"{resolver.task_type} {resolver.task_id} of {workers}"
            + (" (chief)" if is_chief(strategy) else ""))


def describe(strategy):
    """One line for reports: the strategy class and its replicas."""
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # not its class, CollectiveAllReduceStrategy
    line = f"{name} ({strategy.num_replicas_in_sync} replica(s)"
    if is_multi_worker(strategy):
        spec = strategy.cluster_resolver.cluster_spec().as_dict()
        line += f" on {sum(len(v) for v in spec.values())} worker(s)"
    return line + ")"
