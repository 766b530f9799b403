"""The decode contract every backend implements, and what the engine asks of it.

A backend owns a model's compiled step and the KV cache of `num_slots`
sequence slots. The engine (`keras_llm.runtime.engine`) owns everything
else: which request is in which slot, sampling, stops and streaming.

    allocate(num_slots, max_length)   size the cache (backends may lower both)
    prefill(token_ids, slot, reserve) run a whole prompt into a slot -> logits (V,);
                                      `reserve` positions must stay free after it
    step(tokens, rows)                one token for each slot in `rows`, each at
                                      its own position -> (greedy (n,), logits (n, V))
    prompt_positions(n, reserve)      cache positions an n-token prompt takes

and, for speculative decoding (`keras_llm.runtime.speculative`), where
`capabilities.verify_length` is nonzero:

    verify(tokens, slot)              up to `verify_length` tokens into a slot in
                                      one call -> logits (n, V), one row per token
    rewind(slot, length)              keep the slot's first `length` positions

and, optionally:

    release()                         no slot holds a sequence: hand back the cache
                                      memory that can be (a server going idle)

Positions are the backend's business (a backend that left-pads prompts to
shape buckets knows where each row's next token goes); the engine only
promises that a slot's tokens arrive in order.
"""

import dataclasses


@dataclasses.dataclass
class Capabilities:
    """What a backend supports.

    Attributes:
        name: "litert", "xla", "mha-cache" or "recompute".
        max_slots: most sequences one step can hold.
        max_length: cache positions per sequence (prompt plus new tokens).
        vocabulary_size: logits per row.
        dtype: the weights' precision ("float32", "int8", ...).
        row_counts: the step sizes the backend compiles (the engine warms them).
        verify_length: most tokens one `verify` call takes (0: no `verify`).
    """

    name: str
    max_slots: int
    max_length: int
    vocabulary_size: int
    dtype: str = "float32"
    row_counts: tuple = ()
    verify_length: int = 0


def row_counts(num_slots):
    """The step sizes a backend with `num_slots` slots compiles: powers of two
    below it, then `num_slots` itself."""
    counts, rows = [], 1
    while rows < num_slots:
        counts.append(rows)
        rows *= 2
    return tuple(counts + [num_slots])


def concrete(function):
    """`function`'s one concrete function, when it is a `tf.function` (or a
    loaded SavedModel's) with an input signature, else `function` itself.
    Called directly, it skips `tf.function`'s argument matching: 1.1 ms a
    step for SmolLM2's XLA decode on CPU (26.7 against 27.8 ms), 0.4 ms for a
    small user model's recompute step (4.43 against 4.87 ms)."""
    try:
        return function.get_concrete_function()
    except (AttributeError, TypeError, ValueError):  # no signature: called as it is
        return function


class Backend:
    """Base of the backends; see the module docstring for the contract."""

    capabilities: Capabilities

    def allocate(self, num_slots, max_length):
        """Make room for `num_slots` sequences of `max_length` positions;
        returns `(num_slots, max_length)` as granted."""
        raise NotImplementedError

    def prompt_positions(self, length, reserve=0):
        """Cache positions a prompt of `length` tokens occupies when `reserve`
        positions must follow it."""
        del reserve
        return length

    def prefill(self, token_ids, slot, reserve=0):
        """Run `token_ids` into `slot` (replacing what it held), leaving room
        for `reserve` more positions; float32 logits `(V,)` of the last token."""
        raise NotImplementedError

    def step(self, tokens, rows, need_logits=True):
        """Feed `tokens[i]` to slot `rows[i]` at its next position.

        Returns `(greedy (n,) int32, logits (n, V) float32 or None)`; logits
        are None when `need_logits` is False.
        """
        raise NotImplementedError

    def verify(self, tokens, slot):
        """Feed `tokens` to `slot` at its next positions in one call; float32
        logits `(n, V)`, row `i` after `tokens[i]`."""
        raise NotImplementedError(f"the {self.capabilities.name} backend has no verify step")

    def rewind(self, slot, length):
        """Forget all but the first `length` positions of `slot` (the next
        token goes to position `length`)."""
        raise NotImplementedError(f"the {self.capabilities.name} backend cannot rewind a slot")

    def release(self):
        """Every slot is free: give back the cache memory the backend can
        (the engine calls this when it goes idle; default: nothing)."""

    def close(self):
        """Free what the backend holds."""
