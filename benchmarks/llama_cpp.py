"""llama.cpp as a competitor, through `llama-cpp-python` (optional extra `bench`).

The same weights at the same precision: the model's source GGUF is rewritten
with every tensor dequantized to F32 (exactly the float32 weights keras-llm
imported), or those float32 weights quantized to Q8_0 (norms stay F32, as
llama.cpp writes them); metadata and tokenizer are copied unchanged.

The engine drives llama.cpp's C API (`llama_cpp`'s ctypes bindings): a batch
of prompts is decoded as parallel sequences of one context (`n_seq_max`), one
`llama_decode` per step for all of them, greedy argmax of the logits. Its
extra buffer types (weight repacking; the AMX path that crashed on this
model) are turned off with `use_extra_bufts = False`.
"""

import ctypes
import os
import time

import numpy as np

from benchmarks.base import Engine, Run, Unavailable


def write_gguf(source, path, tensor_type):
    """Rewrite `source` with its 2-D weights as `tensor_type` ("F32" or "Q8_0").

    Writes to a staging file and renames it, so `path` is never half-written.
    """
    import gguf  # pylint: disable=import-outside-toplevel

    reader = gguf.GGUFReader(source)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    staging = f"{path}.partial"
    writer = gguf.GGUFWriter(staging, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if tensor_type == "F32"
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    for tensor in reader.tensors:
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(staging, path)
    return path


def _load(path):
    """`(llama_cpp, log callback to keep alive, model)` for the GGUF at
    `path`, llama.cpp's logging silenced and its extra buffer types off."""
    import llama_cpp as lib  # pylint: disable=import-outside-toplevel

    lib.llama_backend_init()
    quiet = lib.llama_log_callback(lambda level, text, data: None)
    lib.llama_log_set(quiet, ctypes.c_void_p())
    params = lib.llama_model_default_params()
    params.use_extra_bufts = False
    model = lib.llama_model_load_from_file(os.fspath(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return lib, quiet, model


class LlamaCppEngine(Engine):
    """llama.cpp on a GGUF rewrite of the model's own source file."""

    ours = False
    tensor_type = "F32"

    def check(self):
        try:
            import llama_cpp  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError:
            raise Unavailable("llama-cpp-python is not installed "
                              "(pip install -e .[bench])") from None
        if not self.s.gguf_source:
            raise Unavailable("the model was not imported from a GGUF file")

    def path(self):
        source = self.s.gguf_source
        stat = os.stat(source)
        stem = os.path.splitext(os.path.basename(source))[0]
        return os.path.join(self.s.cache_dir, "gguf",
                            f"{stem}-{stat.st_size}-{int(stat.st_mtime)}.{self.tensor_type}.gguf")

    def prepare(self):
        path = self.path()
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_gguf(self.s.gguf_source, path, self.tensor_type)

    def setup(self):
        lib, self._quiet, self.model = _load(self.path())
        self.lib = lib
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.sequences = max([1, *self.s.batch_sizes])
        context = lib.llama_context_default_params()
        context.n_seq_max = self.sequences
        context.n_ctx = self.s.context * self.sequences
        context.n_batch = max(self.sequences * max(len(self.s.prefill_prompt),
                                                   len(self.s.prompt)), 512)
        context.n_threads = context.n_threads_batch = self.s.threads
        self.ctx = lib.llama_init_from_model(self.model, context)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = lib.llama_batch_init(context.n_batch, 0, self.sequences)
        self.info.update(file=os.path.basename(self.path()), threads=self.s.threads,
                         n_ctx=context.n_ctx, n_seq_max=self.sequences,
                         flash_attn=str(getattr(context, "flash_attn", "")),
                         llama_cpp_python=lib.__version__)

    def _decode(self, rows):
        """One `llama_decode` of `rows`: (sequence, position, token) triples;
        returns the greedy next token of each row."""
        lib, batch = self.lib, self.batch
        batch.n_tokens = len(rows)
        last = {}
        for i, (seq, pos, token) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = False
            last[seq] = i
        for i in last.values():
            batch.logits[i] = True
        if lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(
            lib.llama_get_logits_ith(self.ctx, i), shape=(self.vocab_size,))))
            for i in last.values()]

    def generate(self, prompts, new_tokens):
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        tokens = self._decode([(seq, pos, token) for seq, prompt in enumerate(prompts)
                               for pos, token in enumerate(prompt)])
        first = time.perf_counter() - start
        out = [[t] for t in tokens]
        length = len(prompts[0])
        for step in range(new_tokens - 1):
            tokens = self._decode([(seq, length + step, token)
                                   for seq, token in enumerate(tokens)])
            for row, token in zip(out, tokens):
                row.append(token)
        return Run(out, first, time.perf_counter() - start - first)

    def close(self):
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)


class LlamaCppF32Engine(LlamaCppEngine):
    name = "llama.cpp-f32"
    description = "llama.cpp (llama-cpp-python), F32 GGUF of the same weights"


class LlamaCppQ80Engine(LlamaCppEngine):
    name = "llama.cpp-q8_0"
    description = "llama.cpp (llama-cpp-python), Q8_0 GGUF of the same weights"
    precision = "q8_0"
    tensor_type = "Q8_0"


class LlamaCppShippedEngine(LlamaCppEngine):
    """llama.cpp on the model's own GGUF as shipped (SmolLM2's is Q4_1), the
    file llama.cpp users run; the counterpart of keras-llm's int4."""

    name = "llama.cpp-shipped"
    description = "llama.cpp (llama-cpp-python), the shipped GGUF file itself"
    precision = "shipped"

    def path(self):
        return self.s.gguf_source

    def prepare(self):
        pass


class LlamaCppLogits:
    """llama.cpp as a scoring model: `token_ids (B, T) -> logits (B, T, V)`,
    every position, one sequence at a time (the interface
    `keras_llm.optimize.metrics.perplexity_and_fidelity` takes).

    Extra buffer types stay off as in the engines above: with them
    (llama.cpp's AMX weight repacking) the shipped Q4_1 file scored a
    perplexity of 382 against 29 without them on an AMX Xeon
    (llama-cpp-python 0.3.16, 2026-12-04).
    """

    def __init__(self, path, threads=2, max_tokens=1024):
        lib, self._quiet, self.model = _load(path)
        self.lib = lib
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        context = lib.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = max_tokens
        context.n_threads = context.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, context)
        self.batch = lib.llama_batch_init(max_tokens, 0, 1)
        self.max_tokens = max_tokens

    def __call__(self, token_ids, training=False):
        del training
        lib, batch = self.lib, self.batch
        out = []
        for row in np.asarray(token_ids):
            if len(row) > self.max_tokens:
                raise ValueError(f"at most {self.max_tokens} tokens per row")
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            batch.n_tokens = len(row)
            for i, token in enumerate(row):
                batch.token[i] = int(token)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            out.append(np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i),
                                                       shape=(self.vocab_size,)).copy()
                                 for i in range(len(row))]))
        return np.stack(out)

    def close(self):
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)
