"""Write tiny Hugging Face checkpoints and transformers' own outputs for them.

Run with an environment that has torch and transformers (not a keras-llm
runtime dependency):

    /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py

For each of Llama, Mistral, Qwen2, Gemma and Phi-3 it builds a random model
of a few tens of thousands of parameters (fixed seeds), saves it with
`save_pretrained(safe_serialization=True)` under `tests/data/hf/<arch>/`, and
writes `reference.json` there: a prompt, transformers' float32 logits for
every position of it, and 16 greedy new tokens (`generate`, no eos stop).
Llama is also saved sharded (`llama-sharded/`) and in bfloat16
(`llama-bf16/`, with logits of the bfloat16 weights computed in float32).
Llama and Qwen2 carry a small byte-level BPE tokenizer trained here, with
reference encodings; the others have none (the model runs on ids).
"""

import json
import pathlib
import shutil

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "hf"
CORPUS = ROOT / "keras_llm" / "data" / "eval_text.txt"
VOCABULARY = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
TOKENIZER_SAMPLES = ["Hello world, this is 2026!", "  two  spaces\tand a tab\n\nnew lines",
                     "<|im_start|>user\nhi<|im_end|>", "naïve café 12345"]
COMMON = dict(vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": transformers.LlamaConfig(**COMMON, rope_theta=10000.0, rms_norm_eps=1e-5),
    # Llama 3.1's rescaled RoPE; the original context is chosen so that each
    # band (kept, interpolated, divided) holds one of head_dim's few frequencies.
    "llama3": transformers.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "mistral": transformers.MistralConfig(**COMMON, rope_theta=100000.0, sliding_window=64),
    "qwen2": transformers.Qwen2Config(**COMMON, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True),
    "gemma": transformers.GemmaConfig(**{**COMMON, "num_key_value_heads": 1}, head_dim=16,
                                      hidden_act="gelu_pytorch_tanh"),
    "phi3": transformers.Phi3Config(**COMMON, rope_theta=10000.0),
}


def train_tokenizer(digits):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer, or with digits split
    off one by one as SmolLM's) trained on the evaluation text."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level]) if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCABULARY, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def randomize(model, seed, gemma):
    """Weights far from HF's 0.02 init, so logits are far apart and greedy
    choices do not depend on rounding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(0.2 * noise if gemma else 1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * 1.5 / param.shape[1] ** 0.5)


def reference(model, prompt):
    """Float32 logits of every prompt position and 16 greedy new tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   min_new_tokens=16, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    return {"prompt": prompt,
            "logits": [[round(float(v), 6) for v in row] for row in logits],
            "greedy": [int(t) for t in generated[0, len(prompt):]]}


def write(directory, model, prompt, tokenizer=None, **save):
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory, safe_serialization=True, **save)
    record = {"transformers": transformers.__version__, **reference(model, prompt)}
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        record["tokenizer"] = {text: tokenizer.encode(text, add_special_tokens=False)
                               for text in TOKENIZER_SAMPLES}
    with open(directory / "reference.json", "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def main():
    torch.manual_seed(0)
    prompt = [int(t) for t in torch.randint(3, VOCABULARY, (11,),
                                            generator=torch.Generator().manual_seed(1))]
    tokenizers = {"llama": train_tokenizer(digits=False), "qwen2": train_tokenizer(digits=True)}
    for seed, (arch, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval()
        randomize(model, seed, arch == "gemma")
        model.generation_config.eos_token_id = None
        write(OUT / arch, model, prompt, tokenizers.get(arch))
        if arch == "llama":
            write(OUT / "llama-sharded", model, prompt, max_shard_size="40KB")
            bf16 = OUT / "llama-bf16"
            write(bf16, model.to(torch.bfloat16), prompt)
            # The reference reads the file back as float32 (bfloat16 weights,
            # float32 math); a model cast back with .to() would keep its RoPE
            # frequencies rounded to bfloat16.
            computed = transformers.AutoModelForCausalLM.from_pretrained(
                bf16, dtype=torch.float32).eval()
            computed.generation_config.eos_token_id = None
            with open(bf16 / "reference.json", "w", encoding="utf-8") as handle:
                json.dump({"transformers": transformers.__version__,
                           **reference(computed, prompt)}, handle)
        print(arch, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main()
