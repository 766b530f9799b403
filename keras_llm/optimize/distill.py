"""Knowledge distillation: a shallower student trained on the teacher's
next-token distributions.

The student is a `build_llama` model with fewer layers (at most half the
teacher's), initialized from the teacher: token embedding, final norm and an
evenly spaced subset of the teacher's blocks (first and last included). It is
trained to minimize `T^2 * KL(softmax(teacher / T) || softmax(student / T))`
over every position of the training text (the teacher's own generations,
`keras_llm.optimize.teacher_text`), with Adam, under a `tf.distribute`
strategy. Checkpoints (`tf.train.CheckpointManager`) and TensorBoard scalars
(`loss`, and `eval_perplexity` / `eval_kl` on the evaluation text) go under
`logdir`; a run with the same logdir resumes from the last checkpoint. Under
multi-worker training only the chief writes them (the other workers save
into a temporary directory that is removed, and all restore the chief's).

Example:
    >>> student = make_student(teacher, num_layers=15)
    >>> distill(teacher, student, batches, steps=300, logdir="/tmp/distill")
"""

import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_llm.models import build_llama, config_from_model
from keras_llm.models.llama import PROJECTIONS
from keras_llm.optimize.metrics import perplexity_and_fidelity
from keras_llm.optimize.strategy import is_chief
from keras_llm.optimize.training import next_token_dataset

BLOCK_LAYERS = PROJECTIONS + ("attention_norm", "mlp_norm")


def student_layer_map(teacher_layers, student_layers):
    """Teacher block index for each student block: evenly spaced, first and last kept."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student layers must be in [1, {teacher_layers}], got {student_layers}")
    if student_layers == 1:
        return [0]
    return [int(round(i)) for i in np.linspace(0, teacher_layers - 1, student_layers)]


def make_student(teacher, num_layers, intermediate_dim=None, name=None):
    """A smaller keras-llm model initialized from `teacher`.

    Args:
        teacher: a keras-llm model.
        num_layers: student blocks; at most half the teacher's.
        intermediate_dim: optional narrower MLP; the teacher's MLP rows and
            columns with the largest gate/up norms are kept.
        name: model name (default: `<teacher>-student`).

    Returns:
        `(student, layer_map)`: the uncompiled model and, per student block,
        the teacher block it starts from.
    """
    config = config_from_model(teacher)
    if not 1 <= num_layers <= config.num_layers // 2:
        raise ValueError(f"a student has at most half the teacher's {config.num_layers} "
                         f"layers (<= {config.num_layers // 2}), got {num_layers}")
    width = intermediate_dim or config.intermediate_dim
    if not 1 <= width <= config.intermediate_dim:
        raise ValueError(f"intermediate_dim must be in [1, {config.intermediate_dim}], got {width}")
    student_config = dataclasses.replace(config, num_layers=num_layers, intermediate_dim=width)
    student = build_llama(student_config, name=name or f"{teacher.name}-student")
    layer_map = student_layer_map(config.num_layers, num_layers)
    copy = {name: name for name in ("token_embedding", "final_norm", "lm_head")}
    for j, i in enumerate(layer_map):
        for kind in BLOCK_LAYERS:
            copy[f"layer_{j}_{kind}"] = f"layer_{i}_{kind}"
    teacher_layers = {layer.name: layer for layer in teacher.layers}
    for layer in student.layers:
        source = copy.get(layer.name)
        if source is None or not layer.weights:
            continue
        weights = teacher_layers[source].get_weights()
        if width != config.intermediate_dim and layer.name.endswith(("mlp_gate", "mlp_up",
                                                                    "mlp_down")):
            weights = [_narrow(teacher_layers, source, weights[0], width)]
        layer.set_weights(weights)
    return student, layer_map


def _narrow(teacher_layers, source, kernel, width):
    block = source.rsplit("_mlp_", 1)[0]
    gate = teacher_layers[block + "_mlp_gate"].get_weights()[0]
    up = teacher_layers[block + "_mlp_up"].get_weights()[0]
    keep = np.sort(np.argsort(-np.linalg.norm(gate, axis=0) * np.linalg.norm(up, axis=0))[:width])
    return kernel[keep, :] if source.endswith("mlp_down") else kernel[:, keep]


def distillation_loss(teacher_logits, student_logits, temperature):
    """Mean over positions of `T^2 * KL(p_teacher^T || p_student^T)`, in nats."""
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p = tf.nn.log_softmax(t, axis=-1)
    log_q = tf.nn.log_softmax(s, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)  # (B, T)
    return tf.reduce_mean(kl) * (temperature ** 2)


class Distiller(keras.Model):
    """Trains `student` on `teacher`'s temperature-softened distributions.

    A training-only wrapper (never saved): `fit` on `(inputs, targets)` batches
    of token ids; the targets are ignored, the teacher's logits are the labels.
    """

    def __init__(self, student, teacher, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.temperature = float(temperature)
        self.teacher.trainable = False

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def train_step(self, data):
        inputs, _ = data
        teacher_logits = self.teacher(inputs, training=False)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            student_logits = self.student(inputs, training=True)
            loss = distillation_loss(teacher_logits, student_logits, self.temperature)
            scaled = loss / replicas  # gradients are summed over replicas
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        # Keras sums what each replica returns ("auto" reduction): the scaled
        # per-replica losses add up to the mean over the global batch.
        return {"loss": scaled}


class _CheckpointAndLog(keras.callbacks.Callback):
    """Saves checkpoints, writes TensorBoard scalars, prints progress."""

    def __init__(self, manager, writer, first_step, total, every, evaluate, eval_every,
                 verbose):
        super().__init__()
        self.manager, self.writer = manager, writer
        self.first_step, self.total = first_step, total
        self.every, self.evaluate, self.eval_every = every, evaluate, eval_every
        self.verbose = verbose
        self.start = time.perf_counter()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        step = self.first_step + batch + 1
        loss = float(logs["loss"])
        self.losses.append(loss)
        with self.writer.as_default():
            tf.summary.scalar("loss", loss, step=step)
        if self.manager is not None and (step % self.every == 0 or step == self.total):
            self.manager.save(checkpoint_number=step)
        if self.evaluate is not None and (step % self.eval_every == 0 or step == self.total):
            figures = self.evaluate()
            with self.writer.as_default():
                tf.summary.scalar("eval_perplexity", figures["perplexity"], step=step)
                tf.summary.scalar("eval_kl", figures["mean_kl"], step=step)
                tf.summary.scalar("eval_top1_agreement", figures["top1_agreement"], step=step)
        if self.verbose and (step % max(1, self.total // 20) == 0 or step == self.total):
            elapsed = time.perf_counter() - self.start
            print(f"[optimize] distill step {step}/{self.total} loss {loss:.4f} "
                  f"({elapsed:.0f}s)", file=sys.stderr, flush=True)
        self.writer.flush()


def distill(teacher, student, batches, steps, temperature=2.0, learning_rate=3e-4,
            logdir=None, strategy=None, eval_batches=None, eval_every=50,
            checkpoint_every=25, verbose=True):
    """Train `student` (in place) to match `teacher` on `batches`.

    Args:
        teacher: the keras-llm teacher model (frozen).
        student: e.g. from `make_student`; built under `strategy.scope()` when
            the strategy has several replicas.
        batches: list of `(B, T + 1)` token-id arrays, cycled.
        steps: total optimizer steps (a resumed run does only the rest).
        temperature: softmax temperature of both distributions.
        learning_rate: Adam learning rate.
        logdir: checkpoints (`logdir/checkpoints`) and TensorBoard scalars
            (`logdir/distill`); None: a temporary directory for scalars, no
            checkpoints.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        eval_batches: evaluation text batches for `eval_perplexity`/`eval_kl`.

    Returns:
        dict: `steps_run`, `resumed_from`, `losses` (this run), `final_loss`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate)
        distiller = Distiller(student, teacher, temperature)
        distiller.compile(optimizer=optimizer)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="distill_step")
    manager = None
    resumed = 0
    chief = is_chief(strategy)
    if logdir:
        checkpoint = tf.train.Checkpoint(student=student, optimizer=optimizer, step=step)
        directory = os.path.join(logdir, "checkpoints")
        # Every worker saves (as TF's multi-worker pattern asks); only the
        # chief's copy is kept.
        manager = tf.train.CheckpointManager(
            checkpoint, directory if chief else tempfile.mkdtemp(prefix="distill-worker-"),
            max_to_keep=2)
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            checkpoint.restore(latest)
            resumed = int(step.numpy())
            if verbose:
                print(f"[optimize] distill: resumed from step {resumed} ({latest})",
                      file=sys.stderr, flush=True)
    remaining = max(0, int(steps) - resumed)
    writer = tf.summary.create_file_writer(os.path.join(logdir, "distill")) \
        if logdir and chief else tf.summary.create_noop_writer()

    def evaluate():
        return perplexity_and_fidelity(student, teacher, eval_batches)

    class _Step(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step.assign_add(1)

    callback = _CheckpointAndLog(manager, writer, resumed, int(steps), checkpoint_every,
                                 evaluate if eval_batches else None, eval_every, verbose)
    try:
        if remaining:
            # Skip the batches the resumed run already consumed.
            distiller.fit(next_token_dataset(batches, offset=resumed),
                          steps_per_epoch=remaining, epochs=1,
                          callbacks=[_Step(), callback], verbose=0)
    finally:
        if manager is not None and not chief:
            shutil.rmtree(manager.directory, ignore_errors=True)
    return {"steps_run": remaining, "resumed_from": resumed, "losses": callback.losses,
            "final_loss": callback.losses[-1] if callback.losses else None,
            "temperature": float(temperature)}
