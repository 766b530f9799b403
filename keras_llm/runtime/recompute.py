"""The generic backend: any causal Keras LM, the whole sequence every step.

`RecomputeBackend` runs a model that maps token ids `(B, T)` to logits
`(B, T, V)` (a user's own mini GPT, a hand-written Llama, anything causal)
without a KV cache: each slot's tokens stay on the host, and every step runs
all active rows' full sequences in one call, right-padded to a length bucket
and a batch bucket, and reads the logits at each row's last real position.
One compiled program per (batch bucket, length bucket), so the number of
compilations is small and known. Causality is what makes right padding
harmless; a one-time probe checks it before the backend is used.

On CPU the forward pass runs on LiteRT/XNNPACK where the model converts
(`keras_llm.litert.convert_recompute`, `runtime.litert.LiteRTRecompute`,
checked against the TensorFlow function by `check_litert`): one file, a
signature per batch bucket, any length. The keras.io mini GPT's steps ran
1.4 ms at 32 positions and 2.8 ms at 64 there, against 3.0 and 5.0 ms with
XLA. Otherwise, and for export, it runs the XLA-compiled function.

Example:
    >>> backend = RecomputeBackend.from_model(model)
    >>> engine = Engine(backend, tokenizer)
"""

import logging

import numpy as np
import tensorflow as tf

from keras_llm.generation import round_up
from keras_llm.runtime.backend import Backend, Capabilities, concrete, row_counts

LOG = logging.getLogger("keras_llm.runtime.recompute")

DEFAULT_MAX_POSITIONS = 2048
# On LiteRT a new length costs no compilation (the time dimension is resized,
# about 0.3 ms), so sequences are padded to a multiple of 8 at every length:
# the built-in-layers GPT's 32 new tokens after 32 took 74 ms against 80 ms
# with the XLA buckets (16 at those lengths), 75 ms with 4, 81 ms with 1.
LITERT_LENGTH_BUCKET = 8
_XLA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
               tf.errors.InternalError, tf.errors.UnknownError)


class RecomputeFunctions(tf.Module):
    """The one compiled forward pass the recompute path runs.

    `last_logits(token_ids (B, T) int32, last (B,) int32)` runs the model on
    the whole batch and returns `(greedy (B,) int32, float32 logits (B, V))`
    at position `last[b]` of each row. A SavedModel written for such a model
    carries this module as its `recompute` attribute, so the server and the
    export's `generate_ids` loop run the same function.

    Where a Functional model's last layers work position by position (its
    output head, and past its last causal `MultiHeadAttention` the query,
    MLP and norms), they run on the rows' last positions only
    (`LastPositionPlan`): the same numbers with less work.

    Args:
        model: a causal Keras LM, `(B, T) -> (B, T, V)`.
        jit_compile: compile with XLA.
        any_length: call the model on lengths other than its fixed input
            length (checked by `runs_shorter`: it computes the same thing).
    """

    def __init__(self, model, jit_compile=True, any_length=False):
        super().__init__(name="recompute")
        self.model = model
        self.any_length = bool(any_length)
        self.plan = last_position_plan(model)
        self.jit_compile = bool(jit_compile)
        self.last_logits = self._function()

    def _function(self):
        return tf.function(
            self._last_logits, jit_compile=self.jit_compile,
            input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                             tf.TensorSpec([None], tf.int32, name="last")])

    def use_xla(self, enabled):
        """Rebuild `last_logits` with or without XLA."""
        self.jit_compile = bool(enabled)
        self.last_logits = self._function()

    def _last_logits(self, token_ids, last):
        return last_logits(self.model, self.plan, token_ids, last, self.any_length)


def last_logits(model, plan, token_ids, last, any_length):
    """`(greedy (B,) int32, float32 logits (B, V))` of `model` on `token_ids
    (B, T)` at position `last[b]` of each row; with a `LastPositionPlan`
    (not None) the layers it names run on those positions only."""
    if plan is None:
        logits = call_model(model, token_ids, any_length)  # (B, T, V)
        logits = tf.gather(logits, last, batch_dims=1)  # (B, V)
    else:
        logits = plan(token_ids, last)
    logits = tf.cast(logits, tf.float32)
    return tf.argmax(logits, axis=-1, output_type=tf.int32), logits


def call_model(model, token_ids, any_length):
    """`model(token_ids)`; with `any_length`, past the input-shape check
    (`Model.call` runs the same layers without it)."""
    if any_length:
        return model.call(token_ids, training=False)
    return model(token_ids, training=False)


# Layers whose output at a position is a function of their inputs at that
# position alone (on `(B, T, H)` tensors): they can run on one position.
_POSITIONWISE = (tf.keras.layers.Dense, tf.keras.layers.LayerNormalization,
                 tf.keras.layers.Activation, tf.keras.layers.Dropout, tf.keras.layers.ReLU,
                 tf.keras.layers.Add, tf.keras.layers.Subtract, tf.keras.layers.Multiply,
                 tf.keras.layers.Average, tf.keras.layers.Maximum, tf.keras.layers.Minimum)
# TensorFlow ops called on Keras tensors (`x + attention`, `tf.nn.gelu(x)`:
# `TFOpLambda` layers) that act element by element, by their symbol.
_ELEMENTWISE_OPS = frozenset({
    "__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv",
    "math.divide", "nn.relu", "nn.gelu", "nn.silu", "math.sigmoid", "math.tanh"})
_MHA = tf.keras.layers.MultiHeadAttention
_MHA_ARGUMENTS = ("query", "value", "key", "attention_mask", "return_attention_scores",
                  "training", "use_causal_mask")


class _Each(dict):
    """`node.map_arguments`' lookup, which pops one value per use from a
    list: the same value, as often as it is used."""

    def __init__(self, lookup):
        super().__init__()
        self._lookup = lookup

    def __getitem__(self, tensor_id):
        return [self._lookup(tensor_id)]


class LastPositionPlan:
    """A Functional model run for its logits at one position per row, with
    the layers after its last mixing of positions on that position alone.

    Only one position's logits are read per step, so the output head (a
    `Dense` over the vocabulary) and, past the last `MultiHeadAttention`
    called with `use_causal_mask=True`, its query projection, the residual
    adds, norms and MLP need that position only: the attention reads every
    position's keys and values and the last one's query (the causal mask
    becomes "positions up to `last`"). Which layers can: the ones in
    `_POSITIONWISE` and the element-wise TensorFlow ops of `_ELEMENTWISE_OPS`
    on `(batch, time, features)` tensors; anything else runs on the whole
    sequence. The same layers and weights, called as the Functional model
    calls them; `last_position_plan` checks the result against the model.

    Args:
        model: a Functional causal LM with one input and one output.
        last_nodes: the nodes (by `id`) that run on the last position only.
    """

    def __init__(self, model, last_nodes):
        self.model = model
        self.last_nodes = frozenset(last_nodes)
        graph = model._nodes_by_depth  # pylint: disable=protected-access
        self.nodes = [node for depth in sorted(graph, reverse=True)  # producers first
                      for node in graph[depth] if not node.is_input]
        self.input_id, self.output_id = str(id(model.inputs[0])), str(id(model.outputs[0]))

    def __call__(self, token_ids, last):
        """The logits `(B, V)` at position `last[b]` of each row of `token_ids (B, T)`."""
        model = self.model
        conform = model._conform_to_reference_input  # pylint: disable=protected-access
        whole = {self.input_id: conform(token_ids, ref_input=model.inputs[0])}  # as Functional
        at_last = {}

        def last_of(tensor_id):  # (B, 1, ...)
            if tensor_id not in at_last:
                at_last[tensor_id] = tf.gather(whole[tensor_id], last[:, tf.newaxis],
                                               batch_dims=1)
            return at_last[tensor_id]

        for node in self.nodes:
            if id(node) not in self.last_nodes:
                args, kwargs = node.map_arguments(_Each(whole.__getitem__))
                outputs = tf.nest.flatten(node.layer(*args, **kwargs))
                whole.update(zip(node.flat_output_ids, outputs))
            elif isinstance(node.layer, _MHA):
                call = _mha_arguments(node)
                value = whole[str(id(call["value"]))]
                key = whole[str(id(call["key"]))] if call.get("key") is not None else None
                upto = (tf.range(tf.shape(value)[1])[tf.newaxis, tf.newaxis, :]
                        <= last[:, tf.newaxis, tf.newaxis])  # (B, 1, T): the causal mask's row
                at_last[node.flat_output_ids[0]] = node.layer(
                    last_of(str(id(call["query"]))), value, key=key, attention_mask=upto)
            else:
                args, kwargs = node.map_arguments(_Each(last_of))
                at_last[node.flat_output_ids[0]] = node.layer(*args, **kwargs)
        return last_of(self.output_id)[:, 0, :]


def _mha_arguments(node):
    """A `MultiHeadAttention` node's call arguments by name."""
    arguments = dict(zip(_MHA_ARGUMENTS, node.call_args))
    arguments.update(node.call_kwargs)
    return arguments


def _batch_sequences(tensors):
    """Whether every tensor is `(batch, time, features)` (no broadcast
    batch or time dimension, no Keras mask)."""
    return all(t.shape.rank == 3 and t.shape[0] is None
               and getattr(t, "_keras_mask", None) is None for t in tensors)


def _runs_at_last(node, attention):
    """Whether `node` can run on one position: a position-wise layer, or
    (with `attention`) a causal self-attention whose query is what is
    asked at the last position."""
    layer = node.layer
    if isinstance(layer, _MHA):
        if not attention:
            return False
        call = _mha_arguments(node)
        return (call.get("use_causal_mask") is True and call.get("attention_mask") is None
                and not call.get("return_attention_scores")
                and _batch_sequences([t for t in (call.get("query"), call.get("value"),
                                                  call.get("key")) if t is not None]))
    if type(layer).__name__ == "TFOpLambda":
        if getattr(layer, "symbol", None) not in _ELEMENTWISE_OPS:
            return False
        tensors = {id(t) for t in node.keras_inputs}  # the rest: scalars and options only
        if not all(id(a) in tensors or isinstance(a, (bool, int, float, str, type(None)))
                   for a in tf.nest.flatten((node.call_args, node.call_kwargs))):
            return False
    elif type(layer) not in _POSITIONWISE:  # pylint: disable=unidiomatic-typecheck
        return False  # a subclass may mix positions
    if isinstance(layer, tf.keras.layers.LayerNormalization):
        if any(axis not in (-1, 2) for axis in layer.axis):
            return False
    return bool(node.keras_inputs) and _batch_sequences(node.keras_inputs)


def last_position_plan(model, attention=True):
    """A `LastPositionPlan` for `model`, or None where it has nothing to
    gain (not a one-input, one-output Functional model, or no layer at its
    end runs on one position) or does not give the model's logits.

    Args:
        model: the causal LM.
        attention: let the last causal `MultiHeadAttention` run its query at
            the last position (False: stop at attention layers, which
            `mha_cache` swaps for its cached ones, which write every position).
    """
    try:
        graph = model._nodes_by_depth  # pylint: disable=protected-access
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return None
    except (AttributeError, TypeError):
        return None
    wanted = {str(id(model.outputs[0])): {"last"}}  # tensor id -> the forms asked of it
    last_nodes = set()
    for depth in sorted(graph):  # consumers before the nodes they read
        for node in graph[depth]:
            if node.is_input:
                continue
            asked = set().union(*(wanted.get(i, set()) for i in node.flat_output_ids))
            if not asked:
                continue
            at_last = (asked == {"last"} and len(node.flat_output_ids) == 1
                       and _runs_at_last(node, attention))
            if at_last:
                last_nodes.add(id(node))
                forms = {str(id(t)): "last" for t in node.keras_inputs}
                if isinstance(node.layer, _MHA):
                    call = _mha_arguments(node)
                    for name in ("value", "key"):  # the query alone runs at the last position
                        if call.get(name) is not None:
                            forms[str(id(call[name]))] = "whole"
            else:
                forms = {str(id(t)): "whole" for t in node.keras_inputs}
            for tensor_id, form in forms.items():
                wanted.setdefault(tensor_id, set()).add(form)
    if not last_nodes:
        return None
    plan = LastPositionPlan(model, last_nodes)
    return plan if _plan_matches(model, plan) else None


def _plan_matches(model, plan, seed=0):
    """Whether `plan` gives `model`'s logits on random ids, two rows with
    different last positions."""
    length = fixed_length(model) or 8
    ids = np.random.default_rng(seed).integers(0, 2, size=(2, length)).astype(np.int32)
    last = np.array([length - 1, length // 2], np.int32)
    try:
        want = tf.gather(call_model(model, tf.constant(ids), True), last, batch_dims=1)
        got = plan(tf.constant(ids), tf.constant(last))
    except Exception as error:  # pylint: disable=broad-except
        LOG.debug("model %r: the last-position plan does not run (%s)", model.name, error)
        return False
    want, got = (np.asarray(tf.cast(x, tf.float32)) for x in (want, got))
    if want.shape != got.shape or float(np.max(np.abs(want - got))) > tolerance(model, want):
        LOG.warning("model %r: its layers on the last position alone do not give its logits; "
                    "the whole sequence runs", model.name)
        return False
    return True


def tolerance(model, reference):
    """Allowed difference from `reference` logits (a probe's earlier
    positions, a cached step's): float32 round-off, or 16-bit round-off for
    a mixed-precision model."""
    sixteen = str(getattr(model, "compute_dtype", "float32")) in ("float16", "bfloat16")
    return (1e-2 if sixteen else 1e-4) * max(1.0, float(np.max(np.abs(reference))))


def probe_model(model, length, vocabulary_size=None, seed=0):
    """Check once, with fixed random ids, that `model` is a causal LM.

    Args:
        model: the Keras model.
        length: the probe's sequence length (the model's fixed input length
            when it has one).
        vocabulary_size: the expected last dimension (None: whatever comes).
        seed: the ids' seed.

    Returns:
        The vocabulary size (the logits' last dimension).

    Raises:
        ValueError: the output is not `(B, T, V)` logits, or changing a later
            token changes the logits at earlier positions (not causal).
    """
    rng = np.random.default_rng(seed)
    high = vocabulary_size or 2
    ids = rng.integers(0, high, size=(1, length)).astype(np.int32)
    cut = max(length // 2, 1)
    changed = ids.copy()
    changed[:, cut:] = (ids[:, cut:] + 1 + rng.integers(0, max(high - 1, 1),
                                                         size=(1, length - cut))) % high
    try:
        outputs = model(tf.constant(np.concatenate([ids, changed])), training=False)
    except Exception as error:  # pylint: disable=broad-except
        raise ValueError(f"model {model.name!r} does not run on token ids of shape "
                         f"(2, {length}): {type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                         ) from None
    if isinstance(outputs, (list, tuple, dict)):
        raise ValueError(f"model {model.name!r} returns {type(outputs).__name__}; a causal LM "
                         "returns one logits tensor (batch, time, vocabulary)")
    logits = np.asarray(tf.cast(outputs, tf.float32))
    if logits.ndim != 3 or logits.shape[:2] != (2, length):
        raise ValueError(f"model {model.name!r} maps token ids (2, {length}) to shape "
                         f"{tuple(logits.shape)}; a causal LM returns logits "
                         "(batch, time, vocabulary)")
    if vocabulary_size is not None and logits.shape[-1] != vocabulary_size:
        raise ValueError(f"model {model.name!r} returns {logits.shape[-1]} logits per position, "
                         f"expected the vocabulary size {vocabulary_size}")
    if vocabulary_size is None:
        return probe_model(model, length, logits.shape[-1], seed)
    change = float(np.max(np.abs(logits[0, :cut] - logits[1, :cut])))
    if change > tolerance(model, logits[0, :cut]):
        raise ValueError(
            f"model {model.name!r} is not causal: changing the tokens from position {cut} on "
            f"changed the logits at earlier positions (by up to {change:.3g}); generation needs "
            "a causal LM (e.g. MultiHeadAttention called with use_causal_mask=True)")
    return int(logits.shape[-1])


def max_positions(model, vocabulary_size=None):
    """The most positions `model` takes, or None when it says nothing.

    A fixed time dimension of its input wins; else the largest input
    dimension of an `Embedding` that is not the token embedding (its input
    dimension differs from the vocabulary size): a learned position
    embedding.
    """
    inputs = getattr(model, "inputs", None)
    if inputs:
        shape = inputs[0].shape
        if shape.rank == 2 and shape[1] is not None:
            return int(shape[1])
    embeddings = [layer.input_dim for layer in model.submodules
                  if isinstance(layer, tf.keras.layers.Embedding)
                  and layer.input_dim != vocabulary_size]
    return max(embeddings) if embeddings else None


def runs_shorter(model, length, fixed, seed=0):
    """Whether a model built for a `fixed` input length gives the same
    logits on `length` tokens as on the first `length` of `fixed` (a
    Functional model only warns about the shape; a causal one then computes
    the same thing, with less work)."""
    ids = np.random.default_rng(seed).integers(0, 2, size=(1, fixed)).astype(np.int32)
    try:
        full = np.asarray(tf.cast(model(tf.constant(ids), training=False), tf.float32))
        short = np.asarray(tf.cast(call_model(model, tf.constant(ids[:, :length]), True),
                                   tf.float32))
    except Exception:  # pylint: disable=broad-except
        return False
    return (short.shape == full[:, :length].shape
            and float(np.max(np.abs(short - full[:, :length]))) <= tolerance(model, full))


def fixed_length(model):
    """The model's fixed input length (its `Input` shape's time dimension), or None."""
    inputs = getattr(model, "inputs", None)
    if inputs and inputs[0].shape.rank == 2 and inputs[0].shape[1] is not None:
        return int(inputs[0].shape[1])
    return None


class RecomputeBackend(Backend):
    """The engine's backend for any causal Keras LM (no KV cache).

    Args:
        functions: a `RecomputeFunctions`, or the `recompute` attribute of a
            loaded export (anything with `last_logits(token_ids, last)`).
        vocabulary_size: logits per row.
        max_length: most positions per sequence (the model's limit).
        max_slots: most sequences one step runs.
        length_bucket: sequences are right-padded to a multiple of this
            (longer ones to a quarter of the next power of two, see
            `padded_length`). 16 against 32: a 32-token prompt's 32 new
            tokens ran 12% faster (one more compilation, about 0.5 s).
        fixed_length: the model only takes this many positions (every call
            is padded to it), or None.
        dtype: the weights' dtype, for `capabilities`.
        litert: a `LiteRTRecompute` of the same forward pass (see
            `check_litert` and `use_litert`); None: the `functions`.
    """

    def __init__(self, functions, vocabulary_size, max_length, max_slots=16, length_bucket=16,
                 fixed_length=None, dtype="float32",  # pylint: disable=redefined-outer-name
                 litert=None):
        self.functions = functions
        self.litert = None
        self.length_bucket = int(length_bucket)
        self.fixed_length = None if fixed_length is None else int(fixed_length)
        self.capabilities = Capabilities("recompute", int(max_slots), int(max_length),
                                         int(vocabulary_size), dtype)
        self._xla_checked = not getattr(functions, "jit_compile", False)
        self._source = self._concrete = None  # see _function
        self.use_litert(litert)

    def use_litert(self, litert):
        """Run the forward pass on `litert` (a `LiteRTRecompute`, or None:
        the TensorFlow function). Steps then take the file's row counts and
        `LITERT_LENGTH_BUCKET` lengths. Frees every slot."""
        self.litert = litert
        self.allocate(getattr(self, "num_slots", 1), self.capabilities.max_length)

    @classmethod
    def from_model(cls, model, max_length=None, jit_compile=True, probe=True, **options):
        """A backend over `model` after the causality probe.

        Args:
            model: a Keras model, token ids `(B, T)` -> logits `(B, T, V)`.
            max_length: most positions per sequence: needed when the model
                does not say (no fixed input length, no position embedding;
                default then 2048); a model's own limit caps it.
            jit_compile: compile with XLA (falls back to plain graphs, with a
                log line, if XLA cannot compile the model).
            probe: run the shape and causality check.
            **options: `max_slots`, `length_bucket`.

        Raises:
            ValueError: the model is not a causal LM (see `probe_model`).
        """
        output_shape = getattr(model, "output_shape", None)
        vocabulary = (output_shape[-1] if isinstance(output_shape, tuple) and output_shape
                      and isinstance(output_shape[-1], int) else None)
        limit = max_positions(model, vocabulary)
        if limit is None:
            limit = int(max_length or DEFAULT_MAX_POSITIONS)
            if max_length is None:
                LOG.info("model %r does not say how many positions it takes; using %d "
                         "(pass max_length to change it)", model.name, limit)
        elif max_length is not None:
            limit = min(limit, int(max_length))
        fixed = fixed_length(model)
        any_length = False
        if probe:
            vocabulary = probe_model(model, fixed or min(8, limit), vocabulary)
            if fixed and runs_shorter(model, min(8, fixed), fixed):
                fixed, any_length = None, True  # run length buckets up to the fixed length
        elif vocabulary is None:
            raise ValueError(f"model {model.name!r}: the vocabulary size is unknown; probe it")
        dtype = str(getattr(model, "compute_dtype", None) or "float32")
        return cls(RecomputeFunctions(model, jit_compile=jit_compile, any_length=any_length),
                   vocabulary, limit,
                   fixed_length=fixed, dtype=dtype, **options)

    def allocate(self, num_slots, max_length):
        num_slots = max(1, min(int(num_slots), self.capabilities.max_slots))
        max_length = min(int(max_length), self.capabilities.max_length)
        self.num_slots, self.max_length = num_slots, max_length
        self._tokens = np.zeros([num_slots, max_length], np.int32)  # each slot's sequence
        self._lengths = np.zeros([num_slots], np.int32)
        counts = row_counts(num_slots)
        if self.litert is not None:  # its counts, up to the first that holds every slot
            more = [n for n in self.litert.row_counts if n >= num_slots]
            if more:
                counts = tuple(n for n in self.litert.row_counts if n <= more[0])
        self.capabilities.row_counts = counts
        return num_slots, max_length

    def padded_length(self, length):
        """The length bucket a sequence of `length` tokens runs in: a
        multiple of `length_bucket`, or of a quarter of the next power of two
        when that is larger (16, 32, 48, 64, 96, 128, 192, 256, 384, ...), so
        that compilations grow with the log of the length; on LiteRT, a
        multiple of `LITERT_LENGTH_BUCKET` (no compilations)."""
        if self.fixed_length is not None:
            return self.fixed_length
        if self.litert is not None:
            return min(round_up(length, LITERT_LENGTH_BUCKET), self.max_length)
        step = max(self.length_bucket, (1 << max(int(length) - 1, 0).bit_length()) // 4)
        return min(round_up(length, step), self.max_length)

    def prefill(self, token_ids, slot, reserve=0):
        ids = np.asarray(token_ids, np.int32).reshape(-1)
        if len(ids) + reserve > self.max_length:
            raise ValueError(f"prompt of {len(ids)} tokens plus {reserve} new tokens exceeds the "
                             f"model's limit of {self.max_length} positions")
        self._tokens[slot] = 0
        self._tokens[slot, :len(ids)] = ids
        self._lengths[slot] = len(ids)
        _, logits = self._run(np.array([slot]))
        return logits[0]

    def step(self, tokens, rows, need_logits=True):
        rows = np.asarray(rows, np.int64)
        if np.any(self._lengths[rows] >= self.max_length):
            raise ValueError(f"a sequence reached the model's limit of {self.max_length} positions")
        self._tokens[rows, self._lengths[rows]] = tokens
        self._lengths[rows] += 1
        greedy, logits = self._run(rows, need_logits)
        return greedy, logits

    def _run(self, rows, need_logits=True):
        """One call over `rows`' full sequences -> (greedy (n,), logits (n, V))."""
        count = next(c for c in self.capabilities.row_counts if c >= len(rows))
        width = self.padded_length(int(self._lengths[rows].max()))
        ids = np.zeros([count, width], np.int32)  # (B, T), right-padded
        ids[:len(rows)] = self._tokens[rows, :width]
        last = np.zeros([count], np.int32)
        last[:len(rows)] = self._lengths[rows] - 1
        greedy, logits = self._call(ids, last)
        n = len(rows)
        return greedy[:n], (logits[:n] if need_logits else None)

    def _call(self, ids, last):
        """`(greedy, logits)` as numpy arrays, on LiteRT where it has the row count."""
        if self.litert is not None and len(ids) in self.litert.row_counts:
            return self.litert(ids, last)
        greedy, logits = self._tf_call(ids, last)
        return greedy.numpy(), logits.numpy()

    def _tf_call(self, ids, last):
        if self._xla_checked:
            return self._function()(tf.constant(ids), tf.constant(last))
        try:
            outputs = self._function()(tf.constant(ids), tf.constant(last))
        except _XLA_ERRORS as error:
            LOG.warning("XLA cannot compile this model (%s); running it without XLA",
                        str(error).strip().splitlines()[0] if str(error).strip() else error)
            self.functions.use_xla(False)
            outputs = self._function()(tf.constant(ids), tf.constant(last))
        self._xla_checked = True
        return outputs

    def _function(self):
        """`functions.last_logits` as its concrete function (see `concrete`;
        `use_xla` replaces the function)."""
        source = self.functions.last_logits
        if self._source is not source:
            self._concrete, self._source = concrete(source), source
        return self._concrete


def check_litert(functions, litert, max_length, vocabulary_size, fixed=None, seed=0):
    """`litert` (a `LiteRTRecompute`) once it gives the logits and greedy
    ids of `functions` (a `RecomputeFunctions`): random ids of one and of
    two rows (where it has a two-row signature), at two lengths (the fixed
    one for a model with a fixed input length).

    Raises:
        ValueError: the logits differ by more than `tolerance`.
    """
    rng = np.random.default_rng(seed)
    widths = [fixed] if fixed else sorted({min(8, max_length), min(24, max_length)})
    for rows in [n for n in (1, 2) if n in litert.row_counts]:
        for width in widths:
            ids = rng.integers(0, vocabulary_size, size=(rows, width)).astype(np.int32)
            last = rng.integers(0, width, size=rows).astype(np.int32)
            greedy, logits = litert(ids, last)
            _, want = last_logits(functions.model, functions.plan, tf.constant(ids),
                                  tf.constant(last), functions.any_length)
            want = want.numpy()  # run eagerly: no compilation for a check
            allowed = tolerance(functions.model, want)
            change = float(np.max(np.abs(logits - want)))
            if change > allowed:
                raise ValueError(f"the LiteRT file's logits differ from the model's by up to "
                                 f"{change:.3g} ({rows} rows, {width} positions)")
            # Its greedy ids are its logits' argmax; only a near tie may pick another.
            picked = np.take_along_axis(want, greedy[:, None].astype(np.int64), axis=1)[:, 0]
            if np.any(want.max(axis=1) - picked > allowed):
                raise ValueError("the LiteRT file picks other greedy tokens than the model")
    return litert
