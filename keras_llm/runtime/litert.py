"""The LiteRT/XNNPACK backend: runs a file written by `keras_llm.litert.convert`.

Nothing here imports TensorFlow: the runtime comes from `ai_edge_litert`
and everything else is numpy, so a process that decodes with LiteRT starts
in about a second. (`keras_llm.litert` converts; it needs TensorFlow.)

A file is compiled with LiteRT's `CompiledModel` and XNNPACK's file-backed
weights cache (`weights_cache_path`): XNNPACK packs each weight once for all
of the file's signatures (decode steps of every batch size and cache
length, the prefill, the verify steps) into a cache file that later
processes memory-map instead of packing again. One file's signatures thus
hold one packed copy of the weights between them.

The past keys/values live in the runtime's own input buffers (numpy views
of their host memory) and each step's new keys/values are written into them
in place. Each decode signature (batch size x cache length) has its own
buffers, allocated when it is first used; `LiteRTBackend` keeps one active,
holding every busy slot, and moves to a larger or smaller one with a single
copy when the batch or the longest sequence needs it. The buffers are
zeroed by handing their pages back (`discard`), never by writing zeros, so
a cache takes memory only for the positions written into it (the runtime
reading the rest maps the kernel's zero page); the signature the batch
moves off, and the prefill's own cache once a long prompt is in, are
handed back the same way. (Freeing the buffers instead saved little: the
allocator kept the memory for the next, and allocating again cost about 5%
of 16 streams' tokens/s.)

The keys/values stay float32: XNNPACK takes neither CAST nor DEQUANTIZE of
a float16 tensor that is not a constant, so a 16-bit cache widened in the
graph runs outside it (measured: a 30-layer attention stack over a
16 x 256-position cache ran 4.5 times slower and held a float32 copy of the
whole cache, 184 MB, in the interpreter's arena).
"""

import ctypes
import glob
import hashlib
import os
import sys

import numpy as np

from keras_llm.runtime.backend import Backend, Capabilities

# Prompts up to this many tokens go through the decode step (one row) instead
# of the prefill step: a 64-token prefill call costs about seven decode steps
# (SmolLM2, float32).
SHORT_PROMPT = 4


def weights_cache_path(path):
    """Where XNNPACK keeps the packed weights of the LiteRT file `path`:
    beside it as `<file>.<key>.xnnpack` (the key: the file's size and
    modification time, so a rewritten file gets a new cache), or, where that
    directory is read-only, under `$KERAS_LLM_HOME/xnnpack/` (named after
    the file's path too)."""
    from keras_llm.runtime.artifacts import home  # pylint: disable=import-outside-toplevel
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    if os.access(os.path.dirname(path), os.W_OK):
        return f"{path}.{key}.xnnpack"
    where = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
    return os.path.join(home(), "xnnpack", f"{os.path.basename(path)}-{where}.{key}.xnnpack")


def _compile(path, num_threads):
    """`CompiledModel` of `path` on the CPU with its weights cache. A new
    cache is written under a name of this process's and renamed into place
    once complete (XNNPACK finishes it while compiling), so processes
    starting together never read each other's half-written cache; the
    caches of earlier versions of the file are removed then."""
    from ai_edge_litert.compiled_model import CompiledModel  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.cpu_options import CpuOptions  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.options import Options  # pylint: disable=import-outside-toplevel

    cache = weights_cache_path(path)
    fresh = not os.path.isfile(cache)
    staging = f"{cache}.{os.getpid()}.partial"
    if fresh:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        remove_dead_partials(cache)
    options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                      cpu_options=CpuOptions(num_threads=num_threads,
                                             xnnpack_weight_cache_path=staging if fresh else cache))
    try:
        model = CompiledModel.from_file(os.fspath(path), options=options)
    except BaseException:
        if os.path.isfile(staging):
            os.remove(staging)
        raise
    if fresh and os.path.isfile(staging):
        os.replace(staging, cache)  # the model keeps its mapping of the file
        for old in glob.glob(glob.escape(_cache_stem(cache)) + ".*.xnnpack"):
            if old != cache:
                os.remove(old)
    release_file_pages(path)
    return model


_MADV_DONTNEED = 4  # Linux


def release_file_pages(path):
    """Drop this process's resident pages of its read-only mappings of
    `path` (`madvise(MADV_DONTNEED)`; Linux). Compiling a file with 8-bit
    weights reads every one of them, whether XNNPACK packs them or maps its
    packed copy, and they stayed resident (120 MB for SmolLM2 int8) though
    only the packed copy is computed with. A page read again later (a row
    of the token table) comes back from the page cache: the mapping is
    read-only, so no data is lost. Returns the bytes advised (0 where
    `/proc/self/maps` is missing)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except OSError:
        return 0
    libc = _libc()
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].rstrip("\n") == real and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                advised += end - start
    return advised


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIBC = None


def _libc():
    global _LIBC  # pylint: disable=global-statement
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


def discard(array):
    """Zero a C-contiguous array, handing its whole pages back to the
    system (`madvise(MADV_DONTNEED)` on the pages it spans; the partial
    pages at its ends are written). Anonymous memory reads back as zeros
    without being resident, so a cache buffer costs memory only for the
    positions written into it: the runtime reading the rest maps the
    kernel's shared zero page."""
    if not array.flags.c_contiguous:  # a reshape would zero a copy
        raise ValueError("discard takes a C-contiguous array")
    flat = array.reshape(-1).view(np.uint8)
    start = array.ctypes.data
    first = -(-start // _PAGE) * _PAGE - start  # offsets within the array
    last = (start + flat.size) // _PAGE * _PAGE - start
    # Only Linux promises zeros after MADV_DONTNEED.
    if (last - first < _PAGE or not sys.platform.startswith("linux")
            or _libc().madvise(start + first, last - first, _MADV_DONTNEED) != 0):
        flat[...] = 0  # not advisable here: write the zeros
        return
    flat[:first] = 0
    flat[last:] = 0


def _cache_stem(cache):
    """`<file>` of a weights cache `<file>.<key>.xnnpack`: what every
    version's cache of that file starts with."""
    return cache[:-len(".xnnpack")].rsplit(".", 1)[0]


def remove_dead_partials(cache):
    """Remove the half-written caches (`<file>.<key>.xnnpack.<pid>.partial`,
    any key) of processes that died before renaming theirs into place; a
    live process's is left alone."""
    for leftover in glob.glob(glob.escape(_cache_stem(cache)) + ".*.xnnpack.*.partial"):
        pid = leftover[:-len(".partial")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.remove(leftover)
            except OSError:
                pass  # another process removed it first


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


_HOST_MEMORY = None


def _host_view(buffer):
    """A numpy array over a `TensorBuffer`'s host memory (no copy): what the
    runtime reads and writes when the signature runs."""
    global _HOST_MEMORY  # pylint: disable=global-statement
    if _HOST_MEMORY is None:
        import ai_edge_litert  # pylint: disable=import-outside-toplevel
        library = ctypes.CDLL(os.path.join(os.path.dirname(ai_edge_litert.__file__),
                                           "libLiteRt.so"))
        _HOST_MEMORY = library.LiteRtGetTensorBufferHostMemory  # LiteRT's C API
        ctypes.pythonapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
        ctypes.pythonapi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    details = buffer.get_tensor_details()
    handle = ctypes.pythonapi.PyCapsule_GetPointer(buffer.capsule, b"LiteRtTensorBuffer")
    address = ctypes.c_void_p()
    if _HOST_MEMORY(ctypes.c_void_p(handle), ctypes.byref(address)) != 0 or not address.value:
        raise RuntimeError("LiteRT gave no host memory for a tensor buffer")
    dtype = np.dtype(details["dtype"])
    count = int(np.prod(details["shape"]))
    memory = (ctypes.c_char * (count * dtype.itemsize)).from_address(address.value)
    return np.frombuffer(memory, dtype).reshape(details["shape"])


class _Signature:
    """One signature of a compiled file, with persistent numpy views of its
    input and output buffers (allocated on first use; a decode step's are
    never resized): they are how the cache is written in place."""

    def __init__(self, model, key):
        self._model = model
        self.key = key
        self.index = model.get_signature_index(key)
        self._inputs = model.get_input_tensor_details(key)
        self._outputs = model.get_output_tensor_details(key)
        # A decode step's rows and cache positions (a recompute signature has neither).
        self.batch_size = self.shape("tokens")[0] if "tokens" in self._inputs else None
        self.length = self.shape("k_0")[2] if "k_0" in self._inputs else None
        self.views = {}
        self.cache_pairs = []  # (cache, the step's new keys/values) views, once bound
        self._buffers = None

    def bind(self):
        """Allocate the signature's buffers, take views of them and zero
        the inputs (they start uninitialized)."""
        inputs = self._model.create_input_buffers(self.index)
        outputs = self._model.create_output_buffers(self.index)
        for names, buffers in ((self._inputs, inputs), (self._outputs, outputs)):
            for name, buffer in zip(names, buffers):
                self.views[name] = _host_view(buffer)
        for name in self._inputs:
            discard(self.views[name])
        self.cache_pairs = [(self.views[name], self.views[f"new_{name}"])
                            for name in self._inputs if f"new_{name}" in self._outputs]
        self._buffers = (inputs, outputs)

    @property
    def allocated(self):
        return self._buffers is not None

    def resize(self, name, shape):
        """Give input `name` (a dynamic one) a new shape; the buffers are
        allocated again (zeroed) for it."""
        self._model.resize_input_tensor(list(self._inputs).index(name), list(shape), self.index)
        self._inputs = self._model.get_input_tensor_details(self.key)
        self._outputs = self._model.get_output_tensor_details(self.key)
        self.views, self._buffers = {}, None
        self.bind()

    @property
    def output_names(self):
        return list(self._outputs)

    def shape(self, name):
        """An input's or output's shape (known before allocation)."""
        details = self._inputs[name] if name in self._inputs else self._outputs[name]
        return tuple(details["shape"])

    def run(self):
        self._model.run_by_index(self.index, *self._buffers)


class LiteRTRunner:
    """Runs what `keras_llm.litert.convert` wrote (one file, or the files of a
    split conversion): prefill, decode steps and teacher-forced logits, with
    each decode signature's KV cache in its own buffers.

    Args:
        path: the `.tflite` file, or a list of files (the first holding the
            prefill); their signatures are used as one set.
        num_threads: XNNPACK threads (default: every CPU core).

    Attributes:
        verify_length: tokens per `verify` call (0: the files have none).
        batch_sizes: the decode batch sizes the file has.
        lengths: the cache lengths of its decode steps (the last is `max_length`).
        max_length: cache positions per sequence.
        prefill_length: tokens per prefill call.

    Compiling a file packs its weights once for all its signatures, or
    maps the packed weights a first compile left in its weights cache; a
    signature's buffers are allocated on first use (`ready`).
    """

    def __init__(self, path, num_threads=None):
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        for file in paths:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"no LiteRT file at {file}")
        self.path, self.paths = paths[0], paths
        self.signatures = {}
        self.models = []
        for file in paths:
            model = _compile(file, num_threads or os.cpu_count())
            self.models.append(model)
            for key in model.get_signature_list():
                if key in self.signatures:
                    raise ValueError(f"signature {key} appears in more than one file")
                self.signatures[key] = _Signature(model, key)
        if "prefill" not in self.signatures:
            raise ValueError(f"{paths[0]} was not written by keras_llm.litert.convert")
        prefill = self.signatures["prefill"]
        self.prefill_length = prefill.shape("tokens")[1]
        _, self.num_key_value_heads, self.max_length, self.head_dim = prefill.shape("k_0")
        self.num_layers = sum(name.startswith("k_") for name in prefill._inputs)  # pylint: disable=protected-access
        # a prompt that fits in one call attends over no past: a short cache
        self.first_chunk = self.signatures.get(f"prefill_s{self.prefill_length}")
        self.verifiers = sorted((sig for key, sig in self.signatures.items()
                                 if key.startswith("verify")), key=lambda sig: sig.length)
        self.verify_length = self.verifiers[0].shape("tokens")[1] if self.verifiers else 0
        self.decoders = {(sig.batch_size, sig.length): sig
                         for key, sig in self.signatures.items() if key.startswith("decode_b")}
        self.batch_sizes = sorted({batch for batch, _ in self.decoders})
        self.lengths = sorted({length for _, length in self.decoders})
        self._cache_names = [f"{kind}_{i}" for i in range(self.num_layers) for kind in "kv"]

    def ready(self, signature):
        """A signature with its buffers allocated (on first use)."""
        if not signature.allocated:
            signature.bind()
        return signature

    def decoder(self, batch_size, length=None):
        """The decode signature with the fewest rows >= `batch_size` and, of
        those, the shortest cache holding `length` positions (default: all)."""
        size = next((b for b in self.batch_sizes if b >= batch_size), None)
        if size is None:
            raise ValueError(f"batch of {batch_size} exceeds the largest compiled decode batch "
                             f"({self.batch_sizes[-1]}); convert with larger batch_sizes")
        need = self.max_length if length is None else int(length)
        if need > self.max_length:
            raise ValueError(f"{need} cache positions exceed the file's {self.max_length}")
        return self.ready(min((sig for (batch, n), sig in self.decoders.items()
                               if batch == size and n >= need), key=lambda sig: sig.length))

    def move_cache(self, source, target, rows, length):
        """Move rows `0..rows-1`, positions `0..length-1` of every layer's
        keys/values from one signature's buffers into another's (when a
        batch moves to a longer cache or another batch size), handing each
        layer's source back (`discard`) as soon as it is copied: at most one
        layer is held twice, not the whole cache (94 MB for SmolLM2's 16
        rows of 128 positions)."""
        rows = min(rows, source.batch_size, target.batch_size)
        length = min(length, source.length, target.length)
        for name in self._cache_names:
            target.views[name][:rows, :, :length] = source.views[name][:rows, :, :length]
            discard(source.views[name])

    def discard_cache(self, signature, outputs=False):
        """Zero a signature's keys/values and hand their memory back (see
        `discard`): they take memory again as positions are written. With
        `outputs`, its outputs too (every run writes them whole): the
        prefill's logits alone are 12.6 MB for SmolLM2."""
        if signature.allocated:
            for name in self._cache_names:
                discard(signature.views[name])
            if outputs:
                self.discard_outputs(signature)

    def discard_outputs(self, signature):
        """Hand a signature's outputs back (see `discard`), where its caches
        stay: their pages are read by every run, written or not, and a
        handed-back page that is read faults again (for SmolLM2's prefill,
        1,024 positions of 30 layers: 12 ms a call)."""
        if signature.allocated:
            for name in signature.output_names:
                discard(signature.views[name])

    def prefill(self, token_ids, targets=(), all_logits=False, start=0):
        """Run one sequence's tokens at cache positions `start, start + 1, ...`
        (RoPE positions from 0); copy its keys/values into row `row` of each
        `(signature, row)` in `targets` (the positions its cache holds).

        Returns the logits of the last token `(V,)`, or of every token
        `(T, V)` with `all_logits`.
        """
        ids = np.asarray(token_ids, np.int32).reshape(-1)
        if not 0 < len(ids) <= self.max_length - start:
            raise ValueError(f"sequence of {len(ids)} tokens from position {start}; this file "
                             f"holds {self.max_length} positions")
        width = self.prefill_length
        step = self.ready(self.first_chunk if start == 0 and len(ids) <= width
                          and self.first_chunk is not None else self.signatures["prefill"])
        pieces = []
        for first in range(0, len(ids), width):
            chunk = ids[first:first + width]
            logits = self.run_chunk(step, chunk, start + first, start, targets,
                                    keep=first + width < len(ids))
            count = len(chunk)
            pieces.append(np.array(logits[:count]) if all_logits else np.array(logits[count - 1]))
        if len(ids) > width:  # the chunks before the last were kept: no longer needed
            self.discard_cache(step)
        # Copied out, the outputs (every position's logits, 12.6 MB for SmolLM2)
        # are not needed until the next prompt: handed back, they take no
        # memory while sequences decode (faulting them in again: about 4 ms of
        # SmolLM2's 60 ms int8 prefill on this project's 2-core machine).
        self.discard_outputs(step)
        return np.concatenate(pieces) if all_logits else pieces[-1]

    def run_chunk(self, signature, ids, at, key_start, targets=(), keep=True):
        """Run one sequence's `ids` (at most the signature's width) through a
        prefill-shaped signature at cache positions `at, at + 1, ...`,
        attending to positions from `key_start`; write their keys/values
        into the signature's own cache (with `keep`) and into row `row` of
        each `(signature, row)` in `targets`. Returns the logits view `(T, V)`
        (its first `len(ids)` rows are theirs)."""
        views, count = signature.views, len(ids)
        views["tokens"][...] = 0
        views["tokens"][0, :count] = ids
        views["index"][0] = at
        views["key_start"][0] = key_start
        signature.run()
        for name in self._cache_names:
            new = views[f"new_{name}"][0, :, :count]
            if keep:
                views[name][0, :, at:at + count] = new
            for target, row in targets:
                stop = min(at + count, target.length)
                if stop > at:
                    target.views[name][row, :, at:stop] = new[:, :stop - at]
        return views["logits"][0]

    def __call__(self, token_ids, training=False):
        """Teacher-forced logits `(B, T, V)` for `(B, T)` token ids."""
        del training
        ids = np.asarray(token_ids, np.int32)
        return np.stack([self.prefill(row, all_logits=True) for row in ids])

    def step(self, signature, tokens, index, key_start=0):
        """One decode step for rows `0..len(tokens)-1` of `signature`, each
        row at its own position `index` (`key_start`: its first real
        position). The new keys/values go into `signature`'s cache (to move
        rows to another signature, `move_cache`). Returns the greedy next
        tokens; the logits stay in `signature.views["logits"]`."""
        views = signature.views
        count = len(tokens)
        rows = np.arange(count)
        index = np.broadcast_to(np.asarray(index), (count,))
        if index.max() >= signature.length:
            raise ValueError(f"position {index.max()} is past {signature.length} cache positions")
        views["tokens"][:count, 0] = tokens
        views["index"][:count] = index
        views["key_start"][:count] = key_start
        signature.run()
        if count == 1:  # plain indexing: 25 us for SmolLM2's 60 caches against 90
            at = int(index[0])
            for cache, new in signature.cache_pairs:
                cache[0, :, at] = new[0, :, 0]
        else:
            for cache, new in signature.cache_pairs:
                cache[rows, :, index] = new[:count, :, 0]
        return np.array(views["greedy"][:count])


class LiteRTBackend(Backend):
    """The engine's backend over a `LiteRTRunner`.

    Args:
        path: the `.tflite` file (or a `LiteRTRunner` already open on one).
        num_threads: XNNPACK threads (default: every core).
        dtype: what the file's weights are, for `capabilities` (the file's
            own metadata says; see `keras_llm.runtime.artifacts`).
    """

    def __init__(self, path, num_threads=None, dtype="float32"):
        self.runner = (path if isinstance(path, LiteRTRunner)
                       else LiteRTRunner(path, num_threads=num_threads))
        r = self.runner
        vocabulary = int(r.signatures["prefill"].shape("logits")[-1])
        self.capabilities = Capabilities("litert", int(r.batch_sizes[-1]), int(r.max_length),
                                         vocabulary, dtype, tuple(int(b) for b in r.batch_sizes),
                                         int(r.verify_length))
        self.active = None
        self._positions = np.zeros([r.batch_sizes[-1]], np.int64)
        # Each verify signature keeps one slot's past in its own buffers:
        # {signature: (slot, positions of it that are current there)}.
        self._mirrors = {}

    def allocate(self, num_slots, max_length):
        # The file's buffers are fixed: grant what fits in them.
        return (min(int(num_slots), self.capabilities.max_slots),
                min(int(max_length), self.capabilities.max_length))

    def _activate(self, rows, length):
        """Make the smallest signature holding `rows` rows of `length`
        positions active, carrying the busy rows' cache over."""
        chosen = self.runner.decoder(rows, min(length, self.runner.max_length))
        if chosen is not self.active:
            if self.active is not None:
                self.runner.move_cache(self.active, chosen, self.active.batch_size,
                                       self.active.length)
                self.runner.discard_outputs(self.active)  # its caches went as they moved
            self.active = chosen
        return chosen

    def prefill(self, token_ids, slot, reserve=0):
        del reserve  # no padding: a prompt takes exactly its length
        ids = np.asarray(token_ids, np.int32).reshape(-1)
        self._mirrors = {sig: held for sig, held in self._mirrors.items() if held[0] != slot}
        # Never shrink here: the active signature holds the other busy rows.
        rows, length = slot + 1, len(ids) + 1
        if self.active is not None:
            rows = max(rows, self.active.batch_size)
            length = max(length, self.active.length)
        target = self._activate(rows, length)
        if target.batch_size == 1 and len(ids) <= SHORT_PROMPT:
            # Alone, with a few tokens: decode steps cost less than a prefill
            # call, which computes all its positions whatever the prompt.
            for position, token in enumerate(ids):
                self.runner.step(target, ids[position:position + 1], [position])
            logits = target.views["logits"][0]
        else:
            logits = self.runner.prefill(ids, [(target, slot)])
        self._positions[slot] = len(ids)
        return np.array(logits, np.float32)

    def step(self, tokens, rows, need_logits=True):
        rows = np.asarray(rows, np.int64)
        count = int(rows.max()) + 1
        feed = np.zeros([count], np.int32)
        feed[rows] = tokens
        index = np.zeros([count], np.int32)
        index[rows] = self._positions[rows]
        # Idle rows below `count` compute at position 0 of their own slot,
        # which the next prefill of that slot overwrites.
        signature = self._activate(count, int(index.max()) + 1)
        greedy = self.runner.step(signature, feed, index)
        self._positions[rows] += 1
        logits = (np.array(signature.views["logits"][rows], np.float32) if need_logits
                  else None)
        return greedy[rows].astype(np.int32), logits

    def verify(self, tokens, slot):
        ids = np.asarray(tokens, np.int32).reshape(-1)
        count, width = len(ids), self.capabilities.verify_length
        if not 0 < count <= width:
            raise ValueError(f"verify takes 1 to {width} tokens, got {count}")
        start = int(self._positions[slot])
        if start + count > self.capabilities.max_length:
            raise ValueError(f"positions up to {start + count} exceed the file's "
                             f"{self.capabilities.max_length}")
        # the shortest cache that holds the slot's positions, as decode steps do
        check = self.runner.ready(next(sig for sig in self.runner.verifiers
                                       if sig.length >= start + count))
        rows = max(slot + 1, self.active.batch_size if self.active is not None else 1)
        target = self._activate(rows, max(start + count, self.active.length
                                          if self.active is not None else 0))
        owner, current = self._mirrors.get(check, (None, 0))
        current = current if owner == slot else 0
        for name in self.runner._cache_names:  # pylint: disable=protected-access
            # the slot's positions the verify buffers lack
            check.views[name][0, :, current:start] = target.views[name][slot, :, current:start]
        logits = self.runner.run_chunk(check, ids, start, 0, [(target, slot)])
        self._positions[slot] = start + count
        self._mirrors[check] = (slot, start + count)
        return np.array(logits[:count], np.float32)

    def rewind(self, slot, length):
        length = int(length)
        if not 0 <= length <= self._positions[slot]:
            raise ValueError(f"slot {slot} holds {self._positions[slot]} positions, "
                             f"cannot keep {length}")
        self._positions[slot] = length
        self._mirrors = {sig: (owner, min(current, length) if owner == slot else current)
                         for sig, (owner, current) in self._mirrors.items()}

    def release(self):
        # Nothing to carry over: every cache is handed back, and the next
        # prefill starts again from the smallest signature.
        for signature in self.runner.signatures.values():
            self.runner.discard_cache(signature, outputs=True)
        self.active = None
        self._mirrors = {}

    def close(self):
        self.active = None
        self.runner = None


class LiteRTRecompute:
    """Runs what `keras_llm.litert.convert_recompute` wrote: a causal LM's
    whole forward pass (no cache) at each row's last position, with the
    interface of `recompute.RecomputeFunctions` on numpy arrays.

    The file has one signature per row count (`rows_{n}`) whose time
    dimension is dynamic: it is resized when a call's length bucket differs
    from the last one's (the buffers are allocated again; XNNPACK's packed
    weights stay), so each signature holds buffers for one length at a time.

    Args:
        path: the `.tflite` file.
        num_threads: XNNPACK threads (default: every CPU core).

    Attributes:
        row_counts: the row counts the file has a signature for.
        calls: forward passes run so far.
    """

    def __init__(self, path, num_threads=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no LiteRT file at {path}")
        self.path = os.fspath(path)
        self._model = _compile(path, num_threads or os.cpu_count())
        self._signatures = {int(key[len("rows_"):]): _Signature(self._model, key)
                            for key in self._model.get_signature_list()
                            if key.startswith("rows_")}
        if not self._signatures:
            raise ValueError(f"{path} was not written by keras_llm.litert.convert_recompute")
        self.row_counts = tuple(sorted(self._signatures))
        self.calls = 0

    def __call__(self, token_ids, last):
        """`(greedy (n,) int32, logits (n, V) float32)` at position `last[b]`
        of each row of `token_ids (n, T)` (`n` one of `row_counts`); the
        arrays are the caller's (copies)."""
        token_ids = np.asarray(token_ids, np.int32)
        rows, width = token_ids.shape
        signature = self._signatures.get(rows)
        if signature is None:
            raise ValueError(f"{self.path} has no signature for {rows} rows "
                             f"(it has {list(self.row_counts)})")
        if not signature.allocated or signature.shape("token_ids")[1] != width:
            signature.resize("token_ids", (rows, width))
        views = signature.views
        views["token_ids"][...] = token_ids
        views["last"][...] = last
        signature.run()
        self.calls += 1
        return views["greedy"].copy(), views["logits"].copy()
