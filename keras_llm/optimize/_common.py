"""Helpers shared by the optimize modules: which layers are projections,
and cloning a keras-llm model with some layers replaced."""

import re

import tf_keras as keras

from keras_llm.models.llama import PROJECTIONS, unwrap

_PROJECTION_RE = re.compile(r"^layer_(\d+)_(%s)$" % "|".join(PROJECTIONS))


def is_projection(layer):
    """True for the attention and MLP projection `Dense` layers of a block."""
    return isinstance(layer, keras.layers.Dense) and bool(_PROJECTION_RE.match(layer.name))


def projection_layers(model, kinds=None):
    """The projection `Dense` layers of `model` (looking through wrappers).

    Args:
        model: a keras-llm model.
        kinds: subset of `PROJECTIONS` ("query", "mlp_down", ...); None: all.
    """
    kinds = set(PROJECTIONS if kinds is None else kinds)
    unknown = kinds - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown projection kinds {sorted(unknown)}; known: {PROJECTIONS}")
    found = []
    for layer in model.layers:
        inner = unwrap(layer)
        match = _PROJECTION_RE.match(inner.name)
        if isinstance(inner, keras.layers.Dense) and match and match.group(2) in kinds:
            found.append(inner)
    return found


def clone_with(model, replace):
    """Clone a Functional keras-llm model, replacing some layers.

    `keras.models.clone_model` with a `clone_function` that rebuilds every
    layer from its config (so the clone shares no variables with `model`),
    or calls `replace(fresh_layer, original_layer)` for layers where that
    returns something other than None. The shared `TokenEmbedding` (called
    twice: lookup and `reverse=True`) is cloned once and called twice, as in
    the original. Weights are then copied layer by layer, by name, into the
    (possibly wrapped) clones.

    Args:
        model: Functional model.
        replace: `fn(fresh_layer, original_layer) -> layer or None`.

    Returns:
        The clone (uncompiled).
    """
    def clone_function(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        replaced = replace(fresh, layer)
        return fresh if replaced is None else replaced

    clone = keras.models.clone_model(model, clone_function=clone_function)
    by_name = {unwrap(layer).name: unwrap(layer) for layer in clone.layers}
    for layer in model.layers:
        inner = unwrap(layer)
        weights = inner.get_weights()
        if not weights:
            continue
        target = by_name[inner.name]
        if type(target) is type(inner):  # replacements set their own weights
            target.set_weights(weights)
    return clone
