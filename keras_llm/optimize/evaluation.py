"""The fixed evaluation text of `keras-llm optimize`, as token batches.

The text is Chapter I of B. M. Gardiner, *The French Revolution 1789-1795*
(1921, public domain, Project Gutenberg #71688), shipped as
`keras_llm/data/eval_text.txt`; `keras_llm/data/README.md` says exactly which
part and what was edited. Quality figures (perplexity, KL, top-1 agreement)
are measured on it and nothing ever trains on it.

Example:
    >>> batches = eval_batches(lm.tokenizer, tokens=4096, sequence_length=256)
    >>> perplexity_and_fidelity(optimized, original, batches)
"""

import os

import numpy as np

EVAL_TEXT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "data", "eval_text.txt")
EVAL_TEXT_DESCRIPTION = (
    "B. M. Gardiner, 'The French Revolution 1789-1795' (1921, public domain), Chapter I "
    "from 'To shake off the yoke' to its end; Project Gutenberg eBook #71688; sidenotes "
    "removed, ASCII typography (keras_llm/data/eval_text.txt, see keras_llm/data/README.md)")


def eval_text():
    """The evaluation text as a str."""
    with open(EVAL_TEXT_PATH, encoding="utf-8") as handle:
        return handle.read()


def eval_token_ids(tokenizer):
    """All token ids of the evaluation text (no BOS, no chat template)."""
    return list(tokenizer.encode(eval_text()))


def eval_batches(tokenizer, tokens=4096, sequence_length=256, batch_size=1):
    """Consecutive windows of the evaluation text, `(batch_size, sequence_length + 1)`.

    Every window scores `sequence_length` next-token predictions, so `tokens`
    predictions in all (rounded down to whole windows, at least one).

    Raises:
        ValueError: the text has fewer tokens than asked for.
    """
    if tokens < 1 or sequence_length < 1 or batch_size < 1:
        raise ValueError("tokens, sequence_length and batch_size must be positive")
    ids = np.asarray(eval_token_ids(tokenizer), np.int32)
    windows = max(1, tokens // sequence_length)
    needed = windows * sequence_length + 1
    if needed > len(ids):
        raise ValueError(f"the evaluation text has {len(ids) - 1} scorable tokens for this "
                         f"tokenizer; asked for {windows * sequence_length}")
    rows = [ids[i * sequence_length:(i + 1) * sequence_length + 1] for i in range(windows)]
    return [np.stack(rows[i:i + batch_size]) for i in range(0, windows, batch_size)]
