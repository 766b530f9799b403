"""Test helpers shared by the suite: tiny models and round-trip checks."""

import json
import socket
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_llm.config import LlamaConfig
from keras_llm.models import build_llama

REPO = Path(__file__).resolve().parents[1]


def free_ports(count=1):
    """`count` distinct loopback ports free at the time of the call (all
    bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
REFERENCE = REPO / "tests" / "data" / "smollm2_reference.json"


def load_reference():
    if not REFERENCE.is_file():
        return None
    with open(REFERENCE, encoding="utf-8") as handle:
        return json.load(handle)


def tiny_model(seed=0, **overrides):
    """A few-thousand-parameter Llama with random (but fixed) weights.

    Weights are scaled up from Keras' defaults so that logits are far apart
    and greedy choices are not decided by float rounding.
    """
    keras.utils.set_random_seed(seed)
    values = {**LlamaConfig.named("tiny").to_dict(), **overrides}
    model = build_llama(LlamaConfig(**values))
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


def assert_layer_round_trip(layer, inputs):
    """`from_config(get_config())` rebuilds a layer that computes the same."""
    expected = layer(inputs)
    clone = layer.__class__.from_config(layer.get_config())
    clone(inputs)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_allclose(clone(inputs).numpy(), expected.numpy(), rtol=0, atol=0)


def assert_saved_model_round_trip(model, path, inputs):
    """Saving to `path` and `tf.keras.models.load_model` gives the same outputs."""
    expected = model(inputs).numpy()
    model.save(path)
    loaded = tf.keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(loaded(inputs).numpy(), expected)
    return loaded


# The chat template SmolLM2-135M-Instruct ships (its GGUF's tokenizer.chat_template).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                          "trained by Hugging Face<|im_end|>\n")


def byte_level_tokenizer(merges=(), specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                         chat_template=None, bos_id=None, add_bos=False):
    """A tiny GPT-2-style tokenizer: special tokens, 256 byte symbols, merges
    (no chat template unless given: ChatML then)."""
    from keras_llm.tokenizer import BytePairTokenizer, bytes_to_unicode

    alphabet = list(bytes_to_unicode())
    vocabulary = list(specials) + alphabet + ["".join(m.split(" ")) for m in merges]
    return BytePairTokenizer(vocabulary, list(merges), special_tokens=list(specials),
                             eos_id=specials.index("<|im_end|>") if "<|im_end|>" in specials else None,
                             pad_id=0, bos_id=bos_id, unk_id=None, add_bos=add_bos,
                             chat_template=chat_template)


def tiny_language_model(seed=0, merges=("h e", "l l", "he ll"), source="tiny", **tokenizer):
    """A `LanguageModel` of a tiny model and a tiny byte-level tokenizer
    (`**tokenizer`: `specials`, `chat_template`, `bos_id`, `add_bos` of
    `byte_level_tokenizer`)."""
    import keras_llm

    tokenizer = byte_level_tokenizer(list(merges), **tokenizer)
    model = tiny_model(seed=seed, vocabulary_size=tokenizer.vocabulary_size)
    return keras_llm.LanguageModel(model, tokenizer, {"source": source})


def random_token_batches(seed=0, count=3, shape=(4, 17), vocabulary_size=300):
    """Reproducible batches of token ids for training and evaluation tests."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocabulary_size, shape).astype(np.int32) for _ in range(count)]


def engine_greedy(backend, prompts, max_new_tokens, max_slots=None):
    """Greedy ids from the runtime engine over `backend`, no stop ids."""
    from keras_llm.runtime.engine import Engine, EngineConfig
    from keras_llm.runtime.params import SamplingParams

    engine = Engine(backend, None, EngineConfig(max_slots=max_slots or len(prompts)), stop_ids=())
    results = engine.generate([list(map(int, p)) for p in prompts],
                              SamplingParams(max_new_tokens=max_new_tokens), text=False)
    return [r.token_ids for r in results]
