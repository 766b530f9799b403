"""`model.fit` for a number of steps on cycled token batches, under the
current `tf.distribute` strategy, resumable after a crash.

The recovery fine-tune and QAT both train this way (`fit_steps`):

- the batches are GLOBAL batches: with N replicas (GPUs, or workers under
  `MultiWorkerMirroredStrategy`) Keras splits each one into N equal slices
  and all-reduces the gradients, so a run on one machine and a run on two
  see the same examples per step and follow the same loss curve (up to
  float rounding of the gradient sums);
- with a `backup_dir`, `tf.keras.callbacks.BackupAndRestore` saves the
  training state (weights, optimizer, step) every `backup_every` steps; a
  run restarted with the same directory restores it and goes on from the
  next step, with the batch that step would have had. Only the chief writes
  the backup (other workers write a temporary copy that is removed), all
  workers read it, so under multi-worker training the directory must be
  storage every worker sees (NFS, GCS). A completed run deletes it.

Example:
    >>> model.compile(optimizer="adam", loss=...)
    >>> history, resumed_from = fit_steps(model, batches, 300, backup_dir="/logs/backup")
"""

import hashlib
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_llm.optimize.strategy import is_multi_worker

_BACKUP_SUBDIR = "chief"  # where BackupAndRestore's chief writes and every worker reads
_SAVED_BATCH = "ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"


def next_token_dataset(batches, offset=0):
    """`(inputs, targets)` = `(b[:, :-1], b[:, 1:])` of the `(B, T + 1)`
    batches, cycled forever, starting with `batches[offset % len(batches)]`."""
    batches = [np.asarray(b, np.int32) for b in batches]
    if not batches:
        raise ValueError("fine_tune_data is empty")
    for b in batches:
        if b.ndim != 2 or b.shape[1] < 2:
            raise ValueError(f"fine-tune batches must be (B, T>=2) token ids, got {b.shape}")
    start = int(offset) % len(batches)

    def generate():
        index = start
        while True:
            yield batches[index][:, :-1], batches[index][:, 1:]
            index = (index + 1) % len(batches)

    spec = tf.TensorSpec([None, None], tf.int32)
    dataset = tf.data.Dataset.from_generator(generate, output_signature=(spec, spec))
    # Under MultiWorkerMirroredStrategy each worker runs the generator and
    # keeps its slice of every global batch (no files to shard by).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def resume_step(backup_dir):
    """Steps already done by the run backed up in `backup_dir` (0: no backup)."""
    if not backup_dir:
        return 0
    latest = tf.train.latest_checkpoint(os.path.join(backup_dir, _BACKUP_SUBDIR))
    if latest is None:
        return 0
    # BackupAndRestore records the index of the last batch it saved after.
    return max(0, int(tf.train.load_checkpoint(latest).get_tensor(_SAVED_BATCH)) + 1)


def fit_steps(model, batches, steps, callbacks=(), verbose=0, backup_dir=None,
              backup_every=50):
    """Train a compiled `model` for `steps` batches of next-token targets.

    Args:
        model: compiled under the strategy it trains with.
        batches: list of `(B, T + 1)` token-id arrays, cycled; B is the
            global batch (divisible by the replicas in sync).
        steps: total steps of the run (a resumed run does the rest).
        callbacks: extra Keras callbacks; `batch` in their hooks is the
            run's step index, also after a resume.
        backup_dir: where `BackupAndRestore` keeps the training state; None:
            no backup.
        backup_every: steps between backups.

    Returns:
        `(history, resumed_from)`: the Keras history of this call and the
        steps the backup had done (0 on a fresh run).
    """
    strategy = model.distribute_strategy
    replicas = strategy.num_replicas_in_sync
    for b in batches:
        if len(b) % replicas:
            raise ValueError(f"the global batch ({len(b)}) must be divisible by the "
                             f"{replicas} replicas in sync; give --batch-size a multiple")
    if is_multi_worker(strategy):
        # Metric results are already reduced over all workers; tf_keras's
        # default ("auto" -> "sum" across workers) would log N times the loss.
        model.distribute_reduction_method = "first"
    resumed = min(resume_step(backup_dir), int(steps))
    backup = []
    if backup_dir:
        backup = [keras.callbacks.BackupAndRestore(backup_dir, save_freq=int(backup_every))]
    # After a restore, Keras numbers steps from the backup on but reads the
    # dataset from its start: start it at the batch of the first new step.
    history = model.fit(next_token_dataset(batches, offset=resumed), steps_per_epoch=int(steps),
                        epochs=1, callbacks=[*backup, *callbacks], verbose=verbose)
    return history, resumed


class StepLosses(keras.callbacks.Callback):
    """The loss of each step (Keras logs the running mean of the epoch),
    optionally written as the TensorBoard scalar `tag`.

    Attributes:
        steps, losses: the run's 1-based step numbers and their losses.
    """

    def __init__(self, writer=None, tag="loss"):
        super().__init__()
        self.writer, self.tag = writer, tag
        self.steps, self.losses = [], []
        self._seen, self._mean = 0, 0.0

    def on_train_begin(self, logs=None):
        self._seen, self._mean = 0, 0.0

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "loss" not in logs:
            return
        mean = float(logs["loss"])
        self._seen += 1
        loss = self._seen * mean - (self._seen - 1) * self._mean
        self._mean = mean
        self.steps.append(batch + 1)
        self.losses.append(loss)
        if self.writer is not None:
            with self.writer.as_default():
                tf.summary.scalar(self.tag, loss, step=batch + 1)
            self.writer.flush()


def weights_digest(model):
    """sha1 (16 hex digits) of a model's weights: equal on every worker of
    a multi-worker run, which the pipeline logs to show it."""
    digest = hashlib.sha1()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def remove_empty_dirs(path, stop):
    """Remove `path` and its parents up to (and including) `stop` while
    they are empty: what is left of a backup directory after a run."""
    path, stop = os.path.abspath(path), os.path.abspath(stop)
    while path.startswith(stop):
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == stop:
            return
        path = os.path.dirname(path)
