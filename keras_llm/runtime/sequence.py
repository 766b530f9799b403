"""Host bookkeeping of one generated sequence, shared by every caller.

`Sequence.push(token)` applies, in order: stop ids (the model's own unless
`ignore_eos`, plus the request's), the UTF-8-safe text decoder (bytes of a
character split across tokens wait for the rest), stop strings (text that
could still become a stop string is held back until it cannot), and the
length limit. What it returns is the text that is final: a stream never
sends text it later takes back.
"""


class Sequence:
    """One sequence's tokens, text and finish reason.

    Args:
        params: a validated `SamplingParams`.
        model_stop_ids: the model's stop ids (eos, `<|im_end|>`, ...).
        decoder: an object with `push(token) -> str` and `flush() -> str`
            (a tokenizer's `stream_decoder()`).

    Example:
        >>> seq = Sequence(params, tokenizer.stop_ids, tokenizer.stream_decoder())
        >>> delta = seq.push(token)      # text now final
        >>> seq.finish_reason            # None while running, then "stop"/"length"/...
    """

    def __init__(self, params, model_stop_ids, decoder):
        self.params = params
        self.tokens = []
        self.text = ""
        self.sent = 0  # characters of `text` already returned
        self.finish_reason = None
        self._decoder = decoder
        stops = set(params.stop_ids)
        if not params.ignore_eos:
            stops.update(int(i) for i in model_stop_ids)
        self._stop_ids = stops
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        if params.max_new_tokens == 0:
            self.finish_reason = "length"

    @property
    def done(self):
        return self.finish_reason is not None

    def push(self, token):
        """Add one generated token; return the text it makes final."""
        if self.done:
            raise RuntimeError("push after the sequence finished")
        token = int(token)
        if token in self._stop_ids:
            return self.finish("stop", flush=False)
        self.tokens.append(token)
        self.text += self._decoder.push(token)
        if self.params.stop:
            start = max(0, self.sent - self._hold)
            hits = [at for at in (self.text.find(s, start) for s in self.params.stop) if at >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self.finish("stop", flush=False)
        if len(self.tokens) >= self.params.max_new_tokens:
            return self.finish("length")
        return self._release(len(self.text) - self._hold)

    def finish(self, reason, flush=True):
        """End the sequence ("stop", "length", "cancelled", "error"); return
        the text not yet returned (a held-back UTF-8 tail is flushed unless
        a stop ended the text)."""
        if self.done and reason != self.finish_reason:
            return ""
        self.finish_reason = reason
        if flush:
            self.text += self._decoder.flush()
        return self._release(len(self.text))

    def _release(self, upto):
        upto = max(upto, self.sent)
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
