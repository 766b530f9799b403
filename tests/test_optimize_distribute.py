"""Training steps under tf.distribute: one step of distillation, pruning
recovery and QAT on two logical CPU devices (MirroredStrategy), in a
subprocess so the rest of the suite keeps its single device."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras_llm  # noqa: E402
from keras_llm.optimize import distill, make_student, measure_sparsity, prune  # noqa: E402
from keras_llm.optimize.quantize import quantization_aware_fine_tune  # noqa: E402
from keras_llm.optimize.strategy import training_strategy  # noqa: E402
from tests.helpers import random_token_batches, tiny_model  # noqa: E402

strategy = training_strategy(["/cpu:0", "/cpu:1"])
teacher = tiny_model(seed=1)
batches = random_token_batches(seed=1, count=2, shape=(4, 17))
with strategy.scope():
    student, _ = make_student(teacher, 1)
before = [w.copy() for w in student.get_weights()]
info = distill(teacher, student, batches, steps=1, strategy=strategy, verbose=False)
student_changed = any(not np.array_equal(a, b) for a, b in zip(before, student.get_weights()))
with strategy.scope():
    pruned, prune_info = prune(teacher, 0.5, fine_tune_data=batches, steps=1,
                               return_info=True)
with strategy.scope():
    int8, wrapped = quantization_aware_fine_tune(teacher, batches, steps=1,
                                                 learning_rate=1e-2)
kernel = [v for v in wrapped.weights if v.name == "layer_0_query/kernel:0"][0]
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "strategy": type(strategy).__name__,
    "distill_loss": info["final_loss"],
    "student_changed": student_changed,
    "variable_devices": sorted({v.device for v in
                                student.weights[0].values}) if hasattr(
                                    student.weights[0], "values") else [],
    "prune_loss": prune_info["loss"][0],
    "sparsity": measure_sparsity(pruned)["overall"],
    "qat_changed": bool(not np.array_equal(
        kernel.numpy(), teacher.get_layer("layer_0_query").kernel.numpy())),
}))
"""


def test_one_training_step_of_each_kind_on_two_logical_cpus():
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "TF_USE_LEGACY_KERAS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["strategy"] == "MirroredStrategy" and result["replicas"] == 2
    assert len(result["variable_devices"]) == 2  # mirrored on both devices
    assert result["student_changed"] and result["distill_loss"] > 0
    assert result["prune_loss"] > 0 and result["sparsity"] == 0.5
    assert result["qat_changed"]
