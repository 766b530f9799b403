"""`SamplingParams`: how one request chooses and stops its tokens.

One type for every entry point (Python, CLI, gRPC, Predict, bench), checked
in one place: `validate` raises `InvalidParams` (a `ValueError`) with a
message that names the field.
"""

import dataclasses
import math
import numbers


MAX_LOGPROBS = 20


class InvalidParams(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclasses.dataclass
class SamplingParams:
    """How to choose tokens for one request.

    Args:
        max_new_tokens: most tokens to generate (a stop token is not counted).
        temperature: 0 for greedy; otherwise the softmax temperature (finite).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens with this much mass, in (0, 1].
        seed: makes sampling reproducible: a row's tokens depend only on
            its seed and prompt, never on what else shares its batch.
        stop_ids: extra ids that end the sequence (the model's own stop ids
            apply unless `ignore_eos`).
        stop: strings that end the sequence; the text returned stops before
            the first of them. Empty strings are an error.
        ignore_eos: keep going past the model's own stop ids.
        logprobs: None for none; else each generated token comes with its
            log-probability under the model (raw logits, before temperature
            or top-k/top-p) and the `logprobs` most likely alternatives
            (0 to 20).

    Example:
        >>> SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1).validate()
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple = ()
    stop: tuple = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def validate(self):
        """Check every field; returns self. Raises `InvalidParams`."""
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InvalidParams(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise InvalidParams(f"{name} must be >= {low}, got {value}")
            setattr(self, name, int(value))

        def real(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidParams(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidParams(f"{name} must be finite, got {value}")
            setattr(self, name, float(value))

        integer("max_new_tokens", 0)
        integer("top_k", 0)
        integer("seed", -(2 ** 63))
        real("temperature")
        real("top_p")
        if self.temperature < 0:
            raise InvalidParams(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParams(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        stops = tuple(self.stop or ())
        if any(not isinstance(s, str) for s in stops):
            raise InvalidParams("stop must be a string or a list of strings")
        if any(s == "" for s in stops):
            raise InvalidParams("stop strings must not be empty")
        self.stop = stops
        ids = tuple(self.stop_ids or ())
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
            raise InvalidParams(f"stop_ids must be non-negative integers, got {list(ids)}")
        self.stop_ids = tuple(int(i) for i in ids)
        self.ignore_eos = bool(self.ignore_eos)
        if self.logprobs is not None:
            integer("logprobs", 0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidParams(f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}")
        return self

    @property
    def greedy(self):
        return self.temperature <= 0.0
