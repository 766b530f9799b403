"""The user-facing object: a model, its tokenizer and a generator."""

import dataclasses
import os
import time

from keras_llm import presets, saving
from keras_llm.generation import Generator, SamplingParams


@dataclasses.dataclass
class Completion:
    """One generated answer.

    Attributes:
        text: the generated text (stop token excluded).
        token_ids: generated ids.
        prompt_token_ids: ids of the (templated) prompt.
        finish_reason: "stop" or "length".
        time_to_first_token_s: from the call to the first token.
        decode_tokens_per_s: tokens after the first, per second of decoding,
            for the whole batch.
        compile_s: XLA compilation before the first token (0 once the
            shapes have been compiled); not part of the other timings.
    """

    text: str
    token_ids: list
    prompt_token_ids: list
    finish_reason: str
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    compile_s: float = 0.0


class LanguageModel:
    """A keras-llm model ready to generate text.

    Args:
        model: the Functional keras model.
        tokenizer: its `BytePairTokenizer`.
        metadata: dict describing where the model came from.
        **generator_options: passed to `Generator`.

    Example:
        >>> lm = keras_llm.load("smollm2")
        >>> lm.generate("The capital of France is", max_new_tokens=8).text
        ' Paris.\\n\\nThe answer is'
    """

    def __init__(self, model, tokenizer, metadata=None, **generator_options):
        self.model = model
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.generator = Generator(model, pad_id=pad, **generator_options)
        self.config = self.generator.config
        if tokenizer.vocabulary_size > self.config.vocabulary_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocabulary_size} tokens but the model "
                f"only {self.config.vocabulary_size}")

    # ----- prompts ---------------------------------------------------------

    def encode(self, prompt, chat=False, system=None):
        """Token ids of `prompt`, optionally wrapped in the chat template."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("empty prompt")
        if chat:
            prompt = self.tokenizer.apply_chat_template(prompt, system=system)
        return self.tokenizer.encode(prompt)  # adds BOS when the tokenizer says so

    def sampling_params(self, max_new_tokens=128, temperature=0.0, top_k=0,
                        top_p=1.0, seed=0, stop_ids=None):
        stops = tuple(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        params = SamplingParams(int(max_new_tokens), float(temperature), int(top_k),
                                float(top_p), int(seed), stops)
        params.validate()
        return params

    # ----- generation ------------------------------------------------------

    def generate(self, prompts, chat=False, system=None, **sampling):
        """Generate for one prompt (returns a `Completion`) or a list of them
        (returns a list). Sampling keywords as in `SamplingParams`."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(p, chat=chat, system=system) for p in texts]
        results = self.generate_ids(ids, **sampling)
        return results[0] if single else results

    def generate_ids(self, prompt_ids, **sampling):
        params = self.sampling_params(**sampling)
        stats = {}
        results = self.generator.generate([list(p) for p in prompt_ids], params, stats)
        steps = stats.get("decode_steps", 0) * len(prompt_ids)
        rate = steps / stats["decode_s"] if stats.get("decode_s") else 0.0
        return [Completion(self.tokenizer.decode(r.token_ids), r.token_ids, list(p),
                           r.finish_reason, stats.get("time_to_first_token_s", 0.0), rate,
                           stats.get("compile_s", 0.0))
                for r, p in zip(results, prompt_ids)]

    def stream(self, prompt, chat=False, system=None, **sampling):
        """Yield `(text_delta, new_ids)` as tokens are produced; the final
        item is the finished `Completion` (check with isinstance)."""
        ids = prompt if isinstance(prompt, (list, tuple)) else self.encode(prompt, chat, system)
        params = self.sampling_params(**sampling)
        decoder = self.tokenizer.stream_decoder()
        stops = set(params.stop_ids)
        generated, reason = [], "length"
        stats = {}
        first_at = None
        for chunk in self.generator.stream([list(ids)], params, stats):
            if first_at is None:
                first_at = time.perf_counter()
            new = []
            for token in chunk[0].tolist():
                if token in stops:
                    reason = "stop"
                    break
                new.append(token)
            generated.extend(new)
            delta = "".join(decoder.push(t) for t in new)
            if new:
                yield delta, new
            if reason == "stop":
                break
        decode_s = time.perf_counter() - first_at if first_at else 0.0
        tail = decoder.flush()
        if tail:
            yield tail, []
        rate = (len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0
        yield Completion(self.tokenizer.decode(generated), generated, list(ids), reason,
                         stats.get("time_to_first_token_s", 0.0), rate,
                         stats.get("compile_s", 0.0))


def load(spec, safe_mode=True, tokenizer=None, progress=True, **generator_options):
    """Load a model by preset name or path.

    Args:
        spec: a preset name (`"smollm2"`), a keras-llm model directory, a
            `.keras`/`.h5` file, or a `.gguf` file.
        safe_mode: refuse model files that carry Python code.
        tokenizer: path of a tokenizer (a model directory or a
            `tokenizer.json`) for bare `.keras`/`.h5` files; by default
            the `tokenizer.json` next to the file.
        progress: show progress on long steps.
        **generator_options: passed to `Generator`.

    Returns:
        A `LanguageModel`.
    """
    from keras_llm import gguf_import  # pylint: disable=import-outside-toplevel
    from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel

    spec = os.fspath(spec)
    if spec in presets.PRESETS:
        directory = presets.preset_dir(spec)
        if not saving.is_model_dir(directory):
            checkpoint = presets.preset_checkpoint(spec)
            model, tok, metadata = gguf_import.load_gguf(checkpoint, progress=progress)
            metadata["preset"] = spec
            saving.save_model_dir(directory, model, tok, metadata)
        else:
            model, tok, metadata = saving.load_model_dir(directory, safe_mode=safe_mode)
        return LanguageModel(model, tok, metadata, **generator_options)
    if saving.is_model_dir(spec):
        return LanguageModel(*saving.load_model_dir(spec, safe_mode=safe_mode),
                             **generator_options)
    if spec.endswith(".gguf"):
        return LanguageModel(*gguf_import.load_gguf(spec, progress=progress),
                             **generator_options)
    if spec.endswith((".keras", ".h5", ".hdf5")):
        model = saving.load_model(spec, safe_mode=safe_mode)
        source = tokenizer or os.path.dirname(os.path.abspath(spec))
        if os.path.isfile(source):
            source = os.path.dirname(os.path.abspath(source))
        if not os.path.isfile(os.path.join(source, saving.TOKENIZER_FILE)):
            raise saving.ModelFileError(
                f"no tokenizer for {spec}: expected {saving.TOKENIZER_FILE} beside it, "
                "or pass a tokenizer path")
        tok = BytePairTokenizer.load_assets(source)
        return LanguageModel(model, tok, {"source": os.path.abspath(spec)},
                             **generator_options)
    if os.path.exists(spec):
        raise saving.ModelFileError(
            f"{spec} is not a model: expected a keras-llm model directory, "
            "a .keras/.h5 file or a .gguf file")
    raise saving.ModelFileError(
        f"unknown model {spec!r}: not a preset ({', '.join(sorted(presets.PRESETS))}) "
        "and no such file or directory")
