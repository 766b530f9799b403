"""The `tf.distribute` strategy training steps run under.

Recovery fine-tuning, QAT and distillation build their models and optimizers
inside `training_strategy().scope()`, so one command uses every GPU of the
machine (`MirroredStrategy`), or the default strategy on a CPU-only machine.
"""

import tensorflow as tf


def training_strategy(devices=None):
    """`MirroredStrategy(devices)` when devices are given or more than one
    GPU is visible, `MirroredStrategy()` on one GPU, else the default strategy.

    Args:
        devices: explicit device names, e.g. ["/cpu:0", "/cpu:1"] (tests).
    """
    if devices:
        return tf.distribute.MirroredStrategy(list(devices))
    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def describe(strategy):
    """One line for reports: the strategy class and its replicas."""
    return f"{type(strategy).__name__} ({strategy.num_replicas_in_sync} replica(s))"
