"""Training text for recovery fine-tuning, QAT and distillation: the teacher
model's own generations from varied prompts, cached on disk.

The evaluation text (`keras_llm.optimize.evaluation`) is never part of it:
prompts are short instructions and openings built here, and the rest is what
the teacher wrote. Sequences are packed into one stream (separated by the end
of text id) and cut into `(batch, length + 1)` windows.

Example:
    >>> ids = teacher_token_stream(lm, tokens=16384, cache_dir="/tmp/cache")
    >>> batches = training_batches(ids, batch_size=4, sequence_length=128)
"""

import hashlib
import itertools
import os
import sys
import tempfile
import time

import numpy as np

_TASKS = (
    "Write a short story about {}.",
    "Explain {} to a curious ten-year-old.",
    "List three surprising facts about {}.",
    "Write a short poem about {}.",
    "What are the advantages and disadvantages of {}?",
    "Describe a day in the life of someone who works with {}.",
    "Give step-by-step advice for a beginner interested in {}.",
    "Write a friendly email inviting a colleague to a talk on {}.",
)
_TOPICS = (
    "lighthouses", "volcanoes", "bread baking", "the moon", "honeybees", "old railways",
    "chess", "rainforests", "glaciers", "bicycles", "ancient libraries", "jazz",
    "coral reefs", "the printing press", "mountain climbing", "city gardens",
    "submarines", "paper making", "thunderstorms", "migratory birds", "clocks",
    "deserts", "recycling", "the Silk Road",
)
_OPENINGS = (
    "Once upon a time, in a village by the sea,",
    "The morning train was late again, and",
    "Scientists have long wondered why",
    "In the summer of that year, the river",
    "My grandmother kept a notebook in which",
    "The recipe is simple:",
    "Here is how a steam engine works.",
    "The museum opened its doors at nine,",
)


def prompts(count):
    """`count` varied prompts: chat instructions and plain-text openings."""
    tasks = [(False, task.format(topic)) for task, topic in itertools.product(_TASKS, _TOPICS)]
    order = np.random.default_rng(0).permutation(len(tasks))
    tasks = [tasks[i] for i in order]
    mixed = []
    for i, opening in enumerate(_OPENINGS):
        mixed.extend(tasks[i * 3:(i + 1) * 3])
        mixed.append((True, opening))
    mixed.extend(tasks[len(_OPENINGS) * 3:])
    return [mixed[i % len(mixed)] for i in range(count)]


def _fingerprint(model, tokens, seed, max_new_tokens):
    digest = hashlib.sha1(f"{tokens}:{seed}:{max_new_tokens}".encode())
    for weight in model.weights:
        digest.update(weight.name.encode())
        digest.update(str(weight.shape).encode())
        digest.update(np.asarray(weight.numpy()).ravel()[:256].tobytes())
    return digest.hexdigest()[:16]


def teacher_token_stream(lm, tokens, cache_dir=None, seed=0, batch_size=16,
                         max_new_tokens=192, temperature=0.8, top_p=0.95, verbose=True):
    """At least `tokens` token ids of text the teacher `lm` wrote.

    Args:
        lm: a `LanguageModel` (the teacher).
        tokens: how many ids to produce.
        cache_dir: where the ids are cached (`teacher-<fingerprint>.npy`); None: no cache.
        seed: sampling seed of the first batch (the next ones add 1, 2, ...).
        batch_size: prompts generated together.
        max_new_tokens: longest answer.
        temperature, top_p: sampling (varied text, still the teacher's).

    Returns:
        int32 array of ids: prompt and answer, one after the other, each
        sequence ended by the tokenizer's end id.
    """
    path = None
    if cache_dir:
        key = _fingerprint(lm.model, tokens, seed, max_new_tokens)
        path = os.path.join(cache_dir, f"teacher-{key}.npy")
        if os.path.isfile(path):
            return np.load(path)
    separator = lm.tokenizer.eos_id if lm.tokenizer.eos_id is not None else 0
    # The engine on LiteRT when the model has its files, else on XLA: text
    # for training is no reason to convert the model first.
    generator = lm if lm.has_litert_files() else lm.on_xla()
    stream, batch_index = [], 0
    start = time.perf_counter()
    while len(stream) < tokens:
        batch = prompts((batch_index + 1) * batch_size)[batch_index * batch_size:]
        ids = [lm.encode(text) if plain else lm.encode(text, chat=True)
               for plain, text in batch]
        room = lm.config.context_length - max(len(i) for i in ids)
        # No longer than the batch needs (a short run asked 1,024 tokens and
        # got 3,202): prompts take about a third.
        needed = -(-(tokens - len(stream)) // len(ids))
        results = generator.generate_ids(ids, max_new_tokens=max(1, min(max_new_tokens, room,
                                                                         max(16, needed))),
                                  temperature=temperature,
                                  top_p=top_p, seed=seed + batch_index)
        for prompt_ids, result in zip(ids, results):
            stream.extend(prompt_ids)
            stream.extend(result.token_ids)
            stream.append(separator)
        batch_index += 1
        if verbose:
            print(f"[optimize] teacher text: {len(stream)}/{tokens} tokens "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    ids = np.asarray(stream, np.int32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".teacher-", suffix=".npy", dir=cache_dir)
        os.close(fd)
        try:
            np.save(tmp, ids)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return ids


def training_batches(ids, batch_size=4, sequence_length=128):
    """Cut a token stream into `(batch_size, sequence_length + 1)` batches
    (windows overlap by one token, so each scores `sequence_length` targets)."""
    ids = np.asarray(ids, np.int32)
    windows = (len(ids) - 1) // sequence_length
    if windows < batch_size:
        raise ValueError(f"{len(ids)} training tokens make {windows} windows of "
                         f"{sequence_length}; need at least {batch_size}")
    rows = np.stack([ids[i * sequence_length:(i + 1) * sequence_length + 1]
                     for i in range(windows)])
    return [rows[i:i + batch_size] for i in range(0, windows - batch_size + 1, batch_size)]
