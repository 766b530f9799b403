"""Turn the embedded SmolLM2 GGUF into a Hugging Face checkpoint directory.

transformers reads the GGUF (dequantizing it to float32) and writes what
`save_pretrained` writes, so `keras_llm.load(DIR)` can be checked against
the GGUF route and tests/data/smollm2_reference.json. Needs torch and
transformers (not keras-llm runtime dependencies):

    GGUF=$(python -c "from keras_llm import presets; print(presets.preset_checkpoint('smollm2'))")
    /tmp/hfvenv/bin/python scripts/smollm2_to_hf.py "$GGUF" /tmp/smollm2-hf
"""

import argparse
import os

import torch
import transformers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("output", help="the directory to write")
    args = parser.parse_args()
    directory, name = os.path.split(os.path.abspath(args.gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # A model read from GGUF is marked quantized and refuses save_pretrained;
    # its weights are plain float32 tensors, so a fresh model takes them.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    fresh.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
