"""One export, loaded for serving: its signatures, tokenizer and engine.

`ExportedModel` reads a version directory written by `keras_llm.export`
and puts the runtime engine (`keras_llm.runtime.engine.Engine`) over the
export's fastest backend: its LiteRT file (XNNPACK) when it has one, else
the XLA functions the SavedModel carries (`engine.allocate/prefill/decode`).
Streaming `Generate` calls and TF Serving `Predict` calls on the generation
signatures both go through that engine, so concurrent clients share its
slots. `score` and unknown signatures run on the SavedModel itself.
"""

import dataclasses
import json
import logging
import os
import threading

from keras_llm.runtime import artifacts
from keras_llm.runtime.engine import (Engine, EngineConfig as RuntimeConfig, EngineError,
                                      EngineStopped, InvalidRequest, QueueFull)
from keras_llm.runtime.speculative import SPECULATIVE_TOKENS
from keras_llm.runtime.tokenizer import TOKENIZER_FILE
from keras_llm.runtime.user_tokenizer import load_tokenizer

LOG = logging.getLogger("keras_llm.serving.engine")

__all__ = ["EngineConfig", "EngineError", "EngineStopped", "ExportedModel", "InvalidRequest",
           "QueueFull"]

BACKENDS = ("auto", "litert", "saved_model")


@dataclasses.dataclass
class EngineConfig:
    """Operator settings of `keras-llm serve`.

    Args:
        max_slots: most sequences decoded together.
        max_queue: most requests waiting for a slot; beyond it submit fails.
        max_length: cache positions per slot (the backend may grant fewer).
        memory_budget_bytes: if set, slots are limited to what fits.
        prompt_bucket: the XLA backend left-pads prompts to a multiple of this.
        default_max_new_tokens: when a request does not say.
        backend: "auto" (the export's LiteRT file when it has one, else its
            XLA functions), "litert" or "saved_model".
        num_threads: LiteRT threads (0: every core).
        max_batch_size: most rows in one Predict request (more: INVALID_ARGUMENT).
        draft: LiteRT files of a draft model for speculative decoding (an
            export version directory or a `.tflite` file keras-llm wrote;
            `keras_llm.runtime.speculative`): a request decoding alone is
            answered faster, with the same tokens. LiteRT backend only.
        speculative_tokens: draft tokens checked per step.
    """

    max_slots: int = 16
    max_queue: int = 64
    max_length: int = 1024
    memory_budget_bytes: int = 0
    prompt_bucket: int = 64
    default_max_new_tokens: int = 128
    backend: str = "auto"
    num_threads: int = 0
    max_batch_size: int = 64
    draft: str = ""
    speculative_tokens: int = SPECULATIVE_TOKENS


class ExportedModel:
    """A loaded export version.

    Args:
        export_dir: a version directory written by `export`.
        config: an `EngineConfig`.

    Attributes:
        module: the loaded SavedModel (its signatures answer `score`); loaded
            on first use when the engine decodes with LiteRT, so a server
            that only generates never holds the TensorFlow copy of the weights.
        metadata: `assets/keras_llm.json`.
        tokenizer: a `HostTokenizer` (or, for a user's model, a
            `TokenizerAdapter`) from the export's assets; None for an export
            without one (ids only).
        engine: the runtime `Engine`, started.
    """

    def __init__(self, export_dir, config=None):
        self.config = config = config or EngineConfig()
        if config.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
        self.export_dir = export_dir
        with open(os.path.join(export_dir, artifacts.EXPORT_METADATA), encoding="utf-8") as handle:
            self.metadata = json.load(handle)
        tokenizer_path = os.path.join(export_dir, "assets", TOKENIZER_FILE)
        self.tokenizer = load_tokenizer(tokenizer_path) if os.path.isfile(tokenizer_path) else None
        self._module = None
        self._module_lock = threading.Lock()
        model = self.metadata["config"]
        self.context_length = int(model["context_length"])
        backend = self._backend(model)
        itemsize = 2 if self.metadata.get("dtype") in ("bfloat16", "float16") else 4
        max_length = min(config.max_length, self.context_length,
                         backend.capabilities.max_length)
        cache = (self.metadata.get("litert") or {}).get("cache")
        if self.metadata.get("backend") == "recompute" and not (
                cache and backend.capabilities.name == "litert"):  # the tokens on the host
            self.bytes_per_slot = 4 * max_length
        elif cache:  # a user's model's LiteRT file with its KV cache (float32)
            self.bytes_per_slot = int(2 * cache["num_layers"] * cache["num_key_value_heads"]
                                      * cache["head_dim"] * max_length * 4)
        else:
            self.bytes_per_slot = int(2 * model["num_layers"] * model["num_key_value_heads"]
                                      * model["head_dim"] * max_length * itemsize)
        slots = min(config.max_slots, backend.capabilities.max_slots)
        if config.memory_budget_bytes:
            slots = min(slots, config.memory_budget_bytes // self.bytes_per_slot)
            if slots < 1:
                raise ValueError(f"memory budget {config.memory_budget_bytes} B is below one "
                                 f"slot ({self.bytes_per_slot} B for {max_length} tokens)")
        self.engine = Engine(backend, self.tokenizer,
                             RuntimeConfig(max_slots=int(slots), max_queue=config.max_queue,
                                           max_length=int(max_length),
                                           default_max_new_tokens=config.default_max_new_tokens,
                                           speculative_tokens=config.speculative_tokens),
                             stop_ids=self.metadata["tokenizer"]["stop_ids"],
                             draft=self._draft(backend))
        self.num_slots, self.max_length = self.engine.num_slots, self.engine.max_length
        LOG.info(json.dumps({"event": "kv_cache", "backend": backend.capabilities.name,
                             "slots": self.num_slots, "context": self.max_length,
                             "bytes_per_slot": self.bytes_per_slot,
                             "bytes": self.bytes_per_slot * self.num_slots}))
        self.engine.start()

    def _draft(self, backend):
        if not self.config.draft:
            return None
        if backend.capabilities.name != "litert":
            raise ValueError("a draft model (--draft) needs the LiteRT backend; this export "
                             f"decodes with {backend.capabilities.name}")
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        return LiteRTBackend(artifacts.litert_files(self.config.draft),
                             num_threads=self.config.num_threads or None)

    def _backend(self, model):
        files = artifacts.export_litert_files(self.export_dir, self.metadata)
        choice = self.config.backend
        if self.metadata.get("backend") == "recompute":  # a user's model: its own forward pass
            from keras_llm.runtime.recompute import RecomputeBackend  # pylint: disable=import-outside-toplevel
            litert = None
            if choice == "litert" and not files:
                raise ValueError(f"{self.export_dir} has no LiteRT file (its model did not "
                                 "convert, or it was exported with --no-litert)")
            if choice != "saved_model" and files:
                from keras_llm.runtime import litert as runtime  # pylint: disable=import-outside-toplevel
                threads = self.config.num_threads or None
                if self.metadata["litert"].get("kind") == "cache":  # the model with its KV cache
                    return runtime.LiteRTBackend(files, num_threads=threads)
                litert = runtime.LiteRTRecompute(files[0], num_threads=threads)
            return RecomputeBackend(self.module.recompute, model["vocabulary_size"],
                                    self.context_length, max_slots=self.config.max_slots,
                                    length_bucket=model["length_bucket"],
                                    fixed_length=model.get("fixed_length"),
                                    dtype=self.metadata.get("dtype") or "float32", litert=litert)
        if choice == "litert" and not files:
            raise ValueError(f"{self.export_dir} has no LiteRT file (it was exported with "
                             "--no-litert)")
        if choice != "saved_model" and files:
            from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
            precision = (self.metadata.get("litert") or {}).get("precision", "float32")
            return LiteRTBackend(files, num_threads=self.config.num_threads or None,
                                 dtype=precision)
        from keras_llm.runtime.xla import XLABackend  # pylint: disable=import-outside-toplevel
        return XLABackend(self.module.engine, model["vocabulary_size"], self.context_length,
                          prompt_bucket=self.config.prompt_bucket,
                          max_slots=self.config.max_slots,
                          dtype=self.metadata.get("dtype") or "float32")

    @property
    def module(self):
        if self._module is None:
            with self._module_lock:
                if self._module is None:
                    # TensorFlow, imported here only: a LiteRT engine decodes
                    # without it. An XLA engine compiles once per machine.
                    artifacts.use_persistent_xla_cache()
                    import tensorflow as tf  # pylint: disable=import-outside-toplevel
                    import tensorflow_text  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (the tokenizer's ops)
                    self._module = tf.saved_model.load(self.export_dir)
        return self._module

    @property
    def signatures(self):
        return self.module.signatures

    @property
    def ready(self):
        return self.engine.ready

    def encode(self, text=None, chat=False, system=None, messages=None):
        """Prompt ids of `text` (in the chat template as one user turn when
        `chat`), or of the conversation `messages` (a list of role/content
        dicts) rendered by the chat template. Raises ValueError for bad
        messages."""
        if self.tokenizer is None:
            raise InvalidRequest("this model was exported without a tokenizer: send token ids")
        if messages is not None:
            if text is not None:
                raise ValueError("give text or messages, not both")
            text = self.tokenizer.apply_chat_template(messages, system=system or None)
        elif chat:
            text = self.tokenizer.apply_chat_template(text, system=system or None)
        # A token covers at most `max_token_bytes` bytes: a text longer than
        # that many per position cannot fit, and is refused before tokenizing.
        limit = self.max_length * self.tokenizer.max_token_bytes
        # Characters <= bytes: a text with more characters than the limit is
        # refused without encoding a copy of it.
        size = len(text) if len(text) > limit else len(text.encode("utf-8", errors="replace"))
        if size > limit:
            raise InvalidRequest(f"prompt of {size} bytes or more exceeds the per-sequence limit of "
                                 f"{self.max_length} positions")
        return self.tokenizer.encode(text)

    def stats(self):
        return self.engine.stats()

    def warmup(self):
        self.engine.warmup()

    def stop(self, timeout=None):
        self.engine.stop(timeout)
