"""The user-facing object: a model, its tokenizer and the engine that runs it.

`load("smollm2")` returns a `LanguageModel` whose `generate` and `stream`
run on the engine (`keras_llm.runtime`), by default over the model's LiteRT
file (XNNPACK): the first use converts the model once and keeps the file
beside it, later uses start in about a second without importing TensorFlow.
The Keras model itself (`lm.model`) is loaded only when something asks for
it (export, optimize, the XLA backend, a first conversion).
"""

import dataclasses
import logging
import os
import shutil
import time
import weakref

from keras_llm import presets
from keras_llm.runtime import artifacts
from keras_llm.runtime.engine import Engine, EngineConfig, decode_rate
from keras_llm.runtime.params import SamplingParams
from keras_llm.runtime.speculative import SPECULATIVE_TOKENS
from keras_llm.runtime.tokenizer import HostTokenizer
from keras_llm.runtime.user_tokenizer import as_host_tokenizer

LOG = logging.getLogger("keras_llm")
BACKENDS = ("auto", "litert", "xla")


@dataclasses.dataclass
class Completion:
    """One generated answer.

    Attributes:
        text: the generated text (stop token and stop string excluded).
        token_ids: generated ids.
        prompt_token_ids: ids of the (templated) prompt.
        finish_reason: "stop" or "length".
        time_to_first_token_s: from the call to the first token.
        decode_tokens_per_s: tokens after the first, per second of decoding,
            for the whole batch.
        compile_s: time spent preparing the backend in this call (loading
            or converting the model, XLA compilation); 0 once it is ready.
            Not part of the other timings.
    """

    text: str
    token_ids: list
    prompt_token_ids: list
    finish_reason: str
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    compile_s: float = 0.0


class LanguageModel:
    """A model ready to generate text.

    Args:
        model: the Functional keras model, or None to load it from `source`
            when needed. A model not built by `build_llama` (any causal LM
            mapping token ids `(B, T)` to logits `(B, T, V)`) generates with
            a KV cache where that is checked to be exact (a Llama-shaped
            model on keras-llm's Llama, `keras_llm.llama_map`; a model whose
            attention is `MultiHeadAttention`, `keras_llm.runtime.mha_cache`), else
            on the recompute backend (`keras_llm.runtime.recompute`).
        tokenizer: its `BytePairTokenizer`, any object with `encode(text) ->
            ids` and `decode(ids) -> text` (e.g. a `tokenizers.Tokenizer`),
            or None: with a `source` that is a model directory, its own;
            else ids only (`generate_ids`, `stream` with ids).
        metadata: dict describing where the model came from.
        source: the model directory or file it was loaded from; its LiteRT
            artifacts are kept there (see `keras_llm.runtime.artifacts`).
        backend: "auto" (LiteRT when the model has or can get a LiteRT file,
            else XLA), "litert" or "xla".
        max_slots: most sequences generated together.
        num_threads: LiteRT threads (default: every core).
        progress: show progress on long steps (a first conversion).
        safe_mode: refuse model files that carry Python code.
        max_positions: for a model that is not a keras-llm Llama and does
            not say how many positions it takes: its limit (default 2048).
        draft: speculative decoding (`keras_llm.runtime.speculative`): the
            draft model that guesses the next tokens while one request
            decodes: "int4" or "int8" (this model's own weights in that
            precision, converted once and kept beside it), or another
            model with the same vocabulary: a `LanguageModel`, what `load`
            takes, or LiteRT files (`artifacts.litert_files`). The output
            stays this model's own (greedy, and sampled with a seed); needs
            the LiteRT backend.
        speculative_tokens: draft tokens checked per step of this model.

    Example:
        >>> lm = keras_llm.load("smollm2")
        >>> lm.generate("The capital of France is", max_new_tokens=8).text
        ' Paris.\\n\\nThe answer is'
    """

    def __init__(self, model=None, tokenizer=None, metadata=None, source=None, backend="auto",
                 max_slots=16, num_threads=None, progress=True, safe_mode=True,
                 max_positions=None, draft=None,
                 speculative_tokens=SPECULATIVE_TOKENS):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if model is None and source is None:
            raise ValueError("give a model or a source to load it from")
        self._model = model
        self._tokenizer = tokenizer
        self.source = None if source is None else os.path.abspath(os.fspath(source))
        self.metadata = dict(metadata or {})
        self.backend_name = backend
        self.max_slots = int(max_slots)
        self.num_threads = num_threads
        self.progress = progress
        self.safe_mode = safe_mode
        self.max_positions = max_positions
        self.draft = draft
        self.speculative_tokens = int(speculative_tokens)
        self.tokenizer_file = None  # the tokenizer.json a bare model file was loaded with
        # A model given here may be the user's own; from a source directory it is keras-llm's.
        self.generic = model is not None and not _is_llama(model)
        if tokenizer is not None:
            self.host_tokenizer = as_host_tokenizer(tokenizer)
        elif self.source is not None and os.path.isdir(self.source):
            self.host_tokenizer = HostTokenizer.load(self.source)
        else:
            self.host_tokenizer = None
        self._engine = None
        if model is not None and self.host_tokenizer is not None:
            vocabulary = (self.config.vocabulary_size if not self.generic
                          else _output_size(model))
            tokens = self.host_tokenizer.vocabulary_size
            if vocabulary is not None and tokens is not None and tokens > vocabulary:
                raise ValueError(f"tokenizer has {tokens} tokens but the model only {vocabulary}")

    # ----- lazily loaded parts ---------------------------------------------

    @property
    def model(self):
        """The Functional tf_keras model (loads TensorFlow on first use)."""
        if self._model is None:
            from keras_llm import saving  # pylint: disable=import-outside-toplevel
            self._model = saving.load_model(os.path.join(self.source, saving.MODEL_FILE),
                                            safe_mode=self.safe_mode)
        return self._model

    @property
    def tokenizer(self):
        """The in-graph `BytePairTokenizer` (TensorFlow), for export."""
        if self._tokenizer is None:
            from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel
            self._tokenizer = BytePairTokenizer.load_assets(self.source)
        return self._tokenizer

    @property
    def config(self):
        """The `LlamaConfig` of a keras-llm model (ValueError for a user's own)."""
        from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel
        return config_from_model(self.model)

    @property
    def engine(self):
        """The `Engine` this model generates with (built on first use)."""
        if self._engine is None:
            backend = self._backend()
            # A user's model runs up to its own limit; keras-llm's caches take 1024.
            length = backend.capabilities.max_length if self.generic else 1024
            config = EngineConfig(max_slots=self.max_slots, max_length=length,
                                  speculative_tokens=self.speculative_tokens)
            draft = self._draft_backend() if self.draft is not None else None
            self._engine = Engine(backend, self.host_tokenizer, config, draft=draft)
        return self._engine

    def _draft_backend(self):
        """The backend of the `draft` model."""
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        draft = self.draft
        if isinstance(draft, str) and draft in artifacts.QUANTIZED_LITERT:
            if self.source is None or self.generic:
                raise ValueError(f"draft={draft!r} converts this model's own weights: it needs a "
                                 "keras-llm model loaded from a directory or file")
            path = (artifacts.cached_litert(self.source, draft)
                    or artifacts.build_litert(self.source, self.model, self.tokenizer, draft,
                                              progress=self.progress))
            return LiteRTBackend(path, num_threads=self.num_threads, dtype=draft)
        if isinstance(draft, (str, os.PathLike)) and (
                os.fspath(draft).endswith(".tflite")
                or os.path.isfile(os.path.join(draft, artifacts.EXPORT_METADATA))):
            return LiteRTBackend(artifacts.litert_files(draft), num_threads=self.num_threads)
        if not isinstance(draft, LanguageModel):
            draft = load(draft, progress=self.progress, backend="litert", max_slots=1,
                         num_threads=self.num_threads)
        return draft._backend()  # pylint: disable=protected-access

    def has_litert_files(self):
        """Whether this model's LiteRT files exist already (generating on
        LiteRT would not start with a conversion)."""
        precision = artifacts.precision_of(self.metadata)
        return bool(self._engine is not None or (
            self.backend_name != "xla" and self.source is not None and precision
            and (artifacts.optimized_litert(self.source, self.metadata)
                 or artifacts.cached_litert(self.source, precision))))

    def on_xla(self):
        """This model on the XLA backend (the same weights and tokenizer)."""
        return LanguageModel(self.model, self.tokenizer, self.metadata, backend="xla",
                             max_slots=self.max_slots, progress=self.progress)

    def _backend(self):
        if not self.generic:
            return self._cached_backend()  # the model loads (TensorFlow) only if needed
        # A user's model gets a KV cache where one is safe: a Llama-shaped one on keras-llm's
        # Llama, a MultiHeadAttention one in its own layers; anything else recomputes.
        from keras_llm import llama_map  # pylint: disable=import-outside-toplevel
        try:
            llama = llama_map.to_llama(self.model, context_length=self.max_positions)
        except ValueError as error:
            LOG.info("model %r is not a Llama keras-llm can rebuild: %s", self.model.name, error)
        else:
            LOG.info("model %r is a Llama (weights mapped onto build_llama, logits checked): "
                     "decoding with a KV cache", self.model.name)
            return self._cached_backend(llama)
        from keras_llm.runtime.mha_cache import MHACacheBackend  # pylint: disable=import-outside-toplevel
        try:
            backend = MHACacheBackend.from_model(self.model, max_length=self.max_positions,
                                                 max_slots=self.max_slots, check=False)
            litert = self._mha_litert(backend) if self.backend_name != "xla" else None
            if litert is None:
                backend.check(min(24, backend.capabilities.max_length))
        except ValueError as error:
            LOG.info("model %r has no KV-cache path (%s): recomputing the whole sequence "
                     "each step", self.model.name, error)
            return self.recompute_backend()
        LOG.info("model %r decodes with a KV cache in its MultiHeadAttention layers on %s "
                 "(cached steps checked against its own logits)", self.model.name,
                 "LiteRT" if litert is not None else "XLA")
        return litert or backend

    def _mha_litert(self, backend):
        """A `LiteRTBackend` over this `MultiHeadAttention` model converted
        with its KV cache (`mha_cache.convert_litert`, once per model file)
        and checked like `backend`, or None (logged) where it does not
        convert or is not float32."""
        from keras_llm.runtime import mha_cache  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        caps = backend.capabilities
        length = caps.max_length
        options = {"max_length": length,
                   "batch_sizes": [b for b in (1, 4, 16) if b < caps.max_slots] + [caps.max_slots],
                   "lengths": [n for n in (256,) if n < length],
                   "prefill_length": min(64, length)}
        return self._user_litert(
            artifacts.MHA_CACHE, options, caps.dtype,
            lambda path: mha_cache.convert_litert(self.model, path, **options),
            lambda path: LiteRTBackend(path, num_threads=self.num_threads),
            lambda litert: mha_cache.check_cache(litert, self.model, min(24, length),
                                                 backend.any_length))

    def recompute_backend(self, litert=True):
        """The recompute backend over this (user's) model, the engine's own
        when it runs on one: the forward pass its export carries, run on
        LiteRT when it converts (with `litert`, and not with
        `backend="xla"`)."""
        from keras_llm.runtime.recompute import RecomputeBackend  # pylint: disable=import-outside-toplevel
        backend = getattr(self._engine, "backend", None)
        if isinstance(backend, RecomputeBackend):
            return backend
        backend = RecomputeBackend.from_model(self.model, max_length=self.max_positions,
                                              max_slots=self.max_slots)
        if litert and self.backend_name != "xla":
            backend.use_litert(self._recompute_litert(backend))
        return backend

    def _recompute_litert(self, backend):
        """A checked `LiteRTRecompute` of `backend`'s forward pass, or None
        (logged) where the model does not convert or is not float32."""
        from keras_llm import litert as converter  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime import recompute  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime.backend import row_counts  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime.litert import LiteRTRecompute  # pylint: disable=import-outside-toplevel
        caps, functions = backend.capabilities, backend.functions
        options = {"row_counts": list(row_counts(caps.max_slots)),
                   "any_length": bool(functions.any_length)}
        return self._user_litert(
            artifacts.RECOMPUTE, options, caps.dtype,
            lambda path: converter.convert_recompute(functions, path, options["row_counts"]),
            lambda path: LiteRTRecompute(path, num_threads=self.num_threads),
            lambda litert: recompute.check_litert(functions, litert, caps.max_length,
                                                  caps.vocabulary_size, backend.fixed_length))

    def _user_litert(self, name, options, dtype, convert, open_file, check):
        """`open_file(path)` of this user's model's LiteRT file `name`
        (`convert(path)` writes it, once per model file: see
        `artifacts.user_litert`) once `check(runtime)` passes; None (logged)
        where the model does not convert, is not float32 or fails the check,
        or raise that error with `backend="litert"`."""
        try:
            if dtype != "float32":
                raise ValueError(f"its compute dtype is {dtype}; LiteRT runs float32 here")
            path, kept = artifacts.user_litert(self.source, name, options, convert,
                                               progress=self.progress)
            runtime = open_file(path)
            if self.source is None:  # a temporary file: gone with the runtime
                weakref.finalize(runtime, shutil.rmtree, os.path.dirname(path), True)
            try:
                check(runtime)
            except ValueError:
                if not kept:
                    raise
                # Converted from the same weights file, but the layers' code (which the
                # file's key cannot see) may have changed since: convert once more.
                LOG.info("model %r: its kept LiteRT %s file is stale; converting again",
                         self.model.name, name)
                os.remove(artifacts.litert_paths(self.source, name)[1])  # the manifest
                runtime = open_file(artifacts.user_litert(self.source, name, options, convert,
                                                          progress=self.progress)[0])
                check(runtime)
            if callable(getattr(runtime, "release", None)):
                runtime.release()  # the check's slots
            return runtime
        except Exception as error:  # pylint: disable=broad-except
            if self.backend_name == "litert":
                raise
            LOG.warning("model %r: no LiteRT %s file, TensorFlow runs it instead (%s)",
                        self.model.name, name, str(error).strip().splitlines()[0]
                        if str(error).strip() else type(error).__name__)
            return None

    def _cached_backend(self, model=None):
        """LiteRT (converted once, kept beside the source) or XLA over a
        keras-llm Llama `model` (default: this one's own, loaded only when
        there is no LiteRT file to run)."""
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        precision = artifacts.precision_of(self.metadata)
        if self.backend_name != "xla" and self.source is not None and precision:
            path = (artifacts.optimized_litert(self.source, self.metadata)
                    or artifacts.cached_litert(self.source, precision))
            if path is None:
                try:
                    # The tokenizer only calibrates int8/int4 smoothing (a user's model
                    # may have none).
                    tokenizer = self.tokenizer if precision in artifacts.QUANTIZED_LITERT else None
                    model = self.model if model is None else model
                    path = artifacts.build_litert(self.source, model, tokenizer,
                                                  precision, progress=self.progress)
                except Exception as error:  # pylint: disable=broad-except
                    if self.backend_name == "litert":
                        raise
                    LOG.warning("LiteRT conversion failed (%s); generating with XLA", error)
                    path = None
            if path is not None:
                return LiteRTBackend(path, num_threads=self.num_threads, dtype=precision)
        elif self.backend_name == "litert":
            raise ValueError("the LiteRT backend needs a float32, int8 or int4 model with a directory "
                             "or file to keep its LiteRT file in (pass source=...)")
        from keras_llm.runtime.xla import XLABackend  # pylint: disable=import-outside-toplevel
        if self.source is not None:  # a model with a home: keep its compiled programs too
            artifacts.use_persistent_xla_cache()
        model = self.model if model is None else model
        return XLABackend.from_model(model, max_slots=self.max_slots)

    # ----- prompts ---------------------------------------------------------

    def encode(self, prompt, chat=False, system=None):
        """Token ids of `prompt`.

        Args:
            prompt: a string; with `chat`, also a conversation
                `[{"role": "system" | "user" | "assistant", "content": str}, ...]`.
            chat: render the prompt with the model's chat template (ChatML
                when it has none); a string is one user turn.
            system: with `chat`, a system message placed first.
        """
        if _is_conversation(prompt):
            if not chat:
                raise ValueError("a list of messages is a chat prompt: pass chat=True")
        elif not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or (with chat=True) a list of messages, "
                            f"got {type(prompt).__name__}")
        elif not prompt:
            raise ValueError("empty prompt")
        if self.host_tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids (generate_ids, or "
                             "stream with a list of ids), or load it with tokenizer=...")
        if chat:
            prompt = self.host_tokenizer.apply_chat_template(prompt, system=system)
        return self.host_tokenizer.encode(prompt)  # adds BOS when the tokenizer says so

    @staticmethod
    def sampling_params(max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                        stop_ids=None, stop=(), ignore_eos=False):
        """A validated `SamplingParams`. `stop_ids=None` stops at the model's
        stop ids; a list replaces them (`()`: never stop early)."""
        if stop_ids is not None:
            ignore_eos = True
        return SamplingParams(max_new_tokens, temperature, top_k, top_p, seed,
                              tuple(stop_ids or ()), stop, ignore_eos).validate()

    # ----- generation ------------------------------------------------------

    def _ready(self):
        start = time.perf_counter()
        engine = self.engine
        return engine, (time.perf_counter() - start)

    def generate(self, prompts, chat=False, system=None, **sampling):
        """Generate for one prompt (returns a `Completion`) or a list of them
        (returns a list), batched together. With `chat`, a prompt may be a
        conversation (a list of role/content dicts; see `encode`). Sampling
        keywords as in `sampling_params`."""
        single = isinstance(prompts, str) or _is_conversation(prompts)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(p, chat=chat, system=system) for p in texts]
        results = self.generate_ids(ids, **sampling)
        return results[0] if single else results

    def generate_ids(self, prompt_ids, **sampling):
        """Like `generate`, for lists of prompt token ids."""
        params = self.sampling_params(**sampling)
        engine, compile_s = self._ready()
        prompts = [list(map(int, p)) for p in prompt_ids]
        results = engine.generate(prompts, params)
        rate = decode_rate(results)
        return [Completion(r.text, r.token_ids, p, r.finish_reason, r.time_to_first_token_s,
                           rate, compile_s) for r, p in zip(results, prompts)]

    def stream(self, prompt, chat=False, system=None, **sampling):
        """Yield `(text_delta, new_ids)` as tokens are produced; the final
        item is the finished `Completion` (check with isinstance). `prompt`
        is a string, a conversation (with `chat`; see `encode`) or token ids."""
        ids = (list(map(int, prompt))
               if isinstance(prompt, (list, tuple)) and not _is_conversation(prompt)
               else self.encode(prompt, chat, system))
        params = self.sampling_params(**sampling)
        engine, compile_s = self._ready()
        for item in engine.stream(ids, params):
            if isinstance(item, tuple):
                yield item
                continue
            steps = max(len(item.token_ids) - 1, 0)
            rate = steps / item.decode_s if item.decode_s > 0 else 0.0
            yield Completion(item.text, item.token_ids, ids, item.finish_reason,
                             item.time_to_first_token_s, rate, compile_s)


def _is_conversation(prompt):
    """Whether `prompt` is a list of chat messages (dicts), not text or ids."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def _is_llama(model):
    """Whether `model` was built by keras-llm's `build_llama`."""
    from keras_llm.models import config_from_model  # pylint: disable=import-outside-toplevel
    try:
        config_from_model(model)
    except ValueError:
        return False
    return True


def _output_size(model):
    """The last dimension of a model's output (its vocabulary), or None."""
    shape = getattr(model, "output_shape", None)
    return shape[-1] if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) else None


def _kind(path):
    """What a model file is, from its first bytes: "gguf", "keras" (a zip),
    "h5" (HDF5) or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        return "keras"
    if head == b"\x89HDF\r\n\x1a\n":
        return "h5"
    return None


def _tokenizer_path(spec, tokenizer):
    """The tokenizer file for a bare model file: `tokenizer` (a file, or a
    directory holding `tokenizer.json`), else `tokenizer.json` beside
    `spec`; None when there is none."""
    from keras_llm.runtime.tokenizer import TOKENIZER_FILE  # pylint: disable=import-outside-toplevel
    path = (os.path.abspath(os.fspath(tokenizer)) if tokenizer is not None
            else os.path.dirname(os.path.abspath(spec)))
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


def _file_tokenizer(spec, tokenizer, required):
    """The tokenizer of a bare `.keras`/`.h5` file `spec` (see `load`): a
    keras-llm `tokenizer.json` as the in-graph `BytePairTokenizer`, a Hugging
    Face one through `tokenizers`, an object as given; None when there is
    none and it is not `required`."""
    from keras_llm import saving  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime import user_tokenizer  # pylint: disable=import-outside-toplevel
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = _tokenizer_path(spec, tokenizer)
    if path is None:
        if tokenizer is not None or required:
            where = tokenizer if tokenizer is not None else f"{saving.TOKENIZER_FILE} beside it"
            raise saving.ModelFileError(f"no tokenizer for {spec}: expected {where}, "
                                        "or pass a tokenizer path")
        return None
    if user_tokenizer.tokenizer_format(path) == "keras_llm":
        from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel
        return BytePairTokenizer.from_config_file(path)
    try:
        return user_tokenizer.load_tokenizer(path)
    except ValueError as error:
        raise saving.ModelFileError(f"cannot read the tokenizer {path}: {error}") from None


def load(spec, safe_mode=True, tokenizer=None, progress=True, backend="auto",
         custom_objects=None, **options):
    """Load a model by preset name or path.

    Args:
        spec: a preset name (`"smollm2"`), a keras-llm model directory, a
            Hugging Face checkpoint directory (`hf_import.is_hf_dir`), a
            `.keras`/`.h5` file, or a `.gguf` file (told apart by content).
            A `.keras`/`.h5` file may hold any causal LM (token ids `(B, T)`
            -> logits `(B, T, V)`); one not built by `build_llama` generates
            as `LanguageModel` says.
        safe_mode: refuse model files that carry Python code.
        tokenizer: for bare `.keras`/`.h5` files: a `tokenizer.json` file
            (keras-llm's or Hugging Face's, told apart by content), the
            directory holding one, or a tokenizer object (see
            `LanguageModel`). Default: `tokenizer.json` beside the model
            file; for a user's model without one, ids only.
        progress: show progress on long steps.
        backend: "auto", "litert" or "xla" (see `LanguageModel`).
        custom_objects: `{name: class}` of the user's own layers, for
            `.keras`/`.h5` files (see `keras_llm.load_model`).
        **options: `max_slots`, `num_threads`, `max_positions` (see
            `LanguageModel`).

    Returns:
        A `LanguageModel`.
    """
    spec = os.fspath(spec)
    common = dict(backend=backend, progress=progress, safe_mode=safe_mode, **options)
    if spec in presets.PRESETS:
        directory = presets.preset_dir(spec)
        if not artifacts.is_model_dir(directory):
            from keras_llm import gguf_import, saving  # pylint: disable=import-outside-toplevel
            checkpoint = presets.preset_checkpoint(spec)
            model, tok, metadata = gguf_import.load_gguf(checkpoint, progress=progress)
            metadata["preset"] = spec
            saving.save_model_dir(directory, model, tok, metadata)
            return LanguageModel(model, tok, metadata, source=directory, **common)
        return LanguageModel(source=directory, metadata=artifacts.read_metadata(directory),
                             **common)
    if artifacts.is_model_dir(spec):
        return LanguageModel(source=spec, metadata=artifacts.read_metadata(spec), **common)
    from keras_llm import hf_import  # pylint: disable=import-outside-toplevel
    if hf_import.is_hf_dir(spec):  # its LiteRT files are keyed on the weights file, as a GGUF's
        return LanguageModel(*hf_import.load_hf(spec, progress=progress),
                             source=hf_import.weights_file(spec), **common)
    from keras_llm import saving  # pylint: disable=import-outside-toplevel
    kind = _kind(spec) if os.path.isfile(spec) else None
    if kind == "gguf":
        from keras_llm import gguf_import  # pylint: disable=import-outside-toplevel
        return LanguageModel(*gguf_import.load_gguf(spec, progress=progress), source=spec,
                             **common)
    if kind == "keras":
        from keras_llm import keras_hub_import  # pylint: disable=import-outside-toplevel
        if keras_hub_import.is_keras_hub_file(spec):  # a keras-hub (Keras 3) Llama or Gemma
            model, _, metadata = keras_hub_import.load_keras_hub(spec, progress=progress)
            tok = _file_tokenizer(spec, tokenizer, required=False)
            return LanguageModel(model, tok, metadata, source=spec, **common)
    if kind in ("keras", "h5"):
        model = saving.load_model(spec, custom_objects=custom_objects, safe_mode=safe_mode)
        tok = _file_tokenizer(spec, tokenizer, required=_is_llama(model))
        lm = LanguageModel(model, tok, {"source": os.path.abspath(spec)}, source=spec, **common)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            lm.tokenizer_file = _tokenizer_path(spec, tokenizer)
        return lm
    if os.path.exists(spec):
        raise saving.ModelFileError(
            f"cannot load {spec}: it is not a keras-llm model directory, "
            "a .keras/.h5 file or a .gguf file (judged by its contents)")
    raise saving.ModelFileError(
        f"unknown model {spec!r}: not a preset ({', '.join(sorted(presets.PRESETS))}) "
        "and no such model file or directory")
