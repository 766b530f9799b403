"""Speculative decoding: a cheap draft model guesses, the original checks.

A draft (the same model with 4-bit weights, or any model with the same
vocabulary on a backend that can `rewind`) proposes a few tokens one at a
time; the original runs all of them in one `verify` call, which costs about
one decode step, and keeps the longest run of guesses that agrees with what
it would have chosen itself, plus its own next token. So each call of the
original yields between one and `tokens + 1` tokens.

Agreement is judged against the original's own choice at each position: its
argmax for a greedy request, and for a sampled one its seeded draw there
(the engine's counter-based noise, `keras_llm.runtime.sampling`, which
depends only on the seed and the token's index). The draft draws with the
same noise, so where the two models' distributions are close their draws
coincide. The output is therefore, token for token, what the original alone
produces, greedy or sampled with a seed; the draft changes only the speed.
(Rejection sampling, the other standard rule, accepts a little more often
but gives a different draw for the same seed.)

The engine speculates while one request is decoding (at batch 1, where the
original's step is bound by reading its weights); with more, it steps them
all together as usual.
"""

import numpy as np

from keras_llm.runtime.sampling import sample

# Draft tokens per verify call by default: the most the default 8-token
# verify step checks. On SmolLM2 with its int4 weights as the draft, 7 gave
# the most tokens/s (README, "Speculative decoding"), 5 and 6 a little less.
SPECULATIVE_TOKENS = 7

# A draft that fell further behind than this (the request decoded in a batch
# for a while) reads the sequence again as a prompt instead of token by token.
CATCH_UP = 16


class Speculator:
    """Drives the draft model for the engine, one sequence at a time.

    Args:
        draft: a `keras_llm.runtime.backend.Backend` with `rewind` (LiteRT).
        tokens: draft tokens per verify call (at most the original's
            `verify_length - 1`).

    Attributes:
        proposed, accepted: draft tokens offered and kept so far.
        calls: verify calls so far.
    """

    def __init__(self, draft, tokens=SPECULATIVE_TOKENS):
        if int(tokens) < 1:
            raise ValueError(f"speculative tokens must be at least 1, got {tokens}")
        self.draft = draft
        self.tokens = int(tokens)
        self.proposed = self.accepted = self.calls = 0
        self._owner = None  # the request whose tokens the draft's slot holds
        self._length = 0  # how many of them are in its cache
        draft.allocate(1, draft.capabilities.max_length)

    @property
    def acceptance_rate(self):
        """Kept draft tokens over proposed ones."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def stats(self):
        return {"proposed": self.proposed, "accepted": self.accepted, "calls": self.calls,
                "acceptance_rate": round(self.acceptance_rate, 4)}

    def room(self, context_length):
        """Most draft tokens the draft's cache has room for after a context."""
        return self.draft.capabilities.max_length - context_length

    def propose(self, owner, context, count, params, first_step):
        """`count` draft tokens following `context` (every token of the
        sequence so far, the last one not yet run by either model), drawn as
        the engine draws token number `first_step`, `first_step + 1`, ..."""
        draft = self.draft
        behind = len(context) - self._length
        if owner is not self._owner or not 0 < behind <= CATCH_UP:
            logits = draft.prefill(context, 0)
        else:
            for token in context[self._length:]:
                _, logits = draft.step(np.array([token], np.int32), [0])
            logits = logits[0]
        self._owner, self._length = owner, len(context)
        guesses = []
        for i in range(count):
            guesses.append(int(sample(logits[np.newaxis], params.temperature, params.top_k,
                                      params.top_p, params.seed, first_step + i)[0]))
            if i + 1 < count:
                _, logits = draft.step(np.array(guesses[-1:], np.int32), [0])
                logits = logits[0]
                self._length += 1
        return guesses

    def kept(self, context_length, accepted, proposed):
        """The original kept `accepted` of the `proposed` guesses that
        followed a context of `context_length` tokens."""
        self.calls += 1
        self.proposed += proposed
        self.accepted += accepted
        self._length = min(self._length, context_length + accepted)
        self.draft.rewind(0, self._length)

    def release(self):
        """No request is running: the draft's cache memory can go."""
        self._owner, self._length = None, 0
        self.draft.release()

    def forget(self, owner):
        """`owner` finished: its tokens are no use to anyone."""
        if owner is self._owner:
            self._owner, self._length = None, 0


def verify(backend, speculator, slot, request, made, limit):
    """One speculative step for the request in `slot`: draft, verify, keep.

    `made`: tokens the request has generated; `limit`: most tokens this
    step may produce. Returns `(tokens, logits)`: the tokens the original
    chose (the kept guesses and its own next one) and its logits before
    each, or None when there is no room to speculate.
    """
    context = request.prompt_ids + request.sequence.tokens
    count = min(speculator.tokens, backend.capabilities.verify_length - 1, limit - 1,
                speculator.room(len(context)))
    if count < 1:
        return None
    params = request.params
    guesses = speculator.propose(request, context, count, params, made)
    logits = backend.verify([context[-1]] + guesses, slot)
    chosen = sample(logits, params.temperature, params.top_k, params.top_p, params.seed,
                    made + np.arange(count + 1))
    kept = 0
    while kept < count and chosen[kept] == guesses[kept]:
        kept += 1
    backend.rewind(slot, len(context) + kept)
    speculator.kept(len(context), kept, count)
    return [int(t) for t in chosen[:kept + 1]], logits
