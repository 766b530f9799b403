"""Quality of quantized files against float32, side by side on the same text:
keras-llm's LiteRT files (int4, int8) and llama.cpp's GGUF files (the shipped
Q4_1, the Q8_0 rewrite), each scored as perplexity, mean KL(float32 ||
file) and top-1 agreement on the optimize report's evaluation text.

    python -m benchmarks.quantized_quality [--model smollm2] [--tokens 4096]
        [--litert int4=FILE ...] [--gguf shipped|q8_0|PATH ...]

`--litert NAME=FILE` names a LiteRT file (its prefill signature scores the
text); without any, the model's own int4 files are built (or reused) in its
artifact directory. `--gguf shipped` is the model's source GGUF itself,
`q8_0` the benchmark suite's Q8_0 rewrite. Prints one JSON object.
"""

import argparse
import json
import os
import sys


def _float_reference(model_name):
    import keras_llm  # pylint: disable=import-outside-toplevel

    return keras_llm.load(model_name, progress=False, backend="xla")


def _int4_files(lm):
    from keras_llm.runtime import artifacts  # pylint: disable=import-outside-toplevel

    return (artifacts.cached_litert(lm.source, "int4")
            or artifacts.build_litert(lm.source, lm.model, lm.tokenizer, "int4"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--litert", nargs="*", default=None, metavar="NAME=FILE")
    parser.add_argument("--gguf", nargs="*", default=["shipped"])
    args = parser.parse_args(argv)

    from benchmarks.first_minute import _settings  # pylint: disable=import-outside-toplevel
    from benchmarks.llama_cpp import (LlamaCppLogits,  # pylint: disable=import-outside-toplevel
                                      LlamaCppQ80Engine)
    from keras_llm.optimize import evaluation  # pylint: disable=import-outside-toplevel
    from keras_llm.optimize.metrics import perplexity_and_fidelity  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.litert import LiteRTRunner  # pylint: disable=import-outside-toplevel

    lm = _float_reference(args.model)
    batches = evaluation.eval_batches(lm.tokenizer, args.tokens, args.sequence_length)
    files = dict(item.split("=", 1) for item in args.litert) if args.litert else \
        {"keras-llm int4": _int4_files(lm)[0]}
    settings = _settings(args.model)
    results = {}
    for name, path in files.items():
        runner = LiteRTRunner(path, num_threads=2)
        results[name] = perplexity_and_fidelity(runner, lm.model, batches)
        results[name]["file"] = os.path.basename(path)
    for choice in args.gguf:
        if choice == "shipped":
            path, name = settings.gguf_source, "llama.cpp shipped " + os.path.basename(
                settings.gguf_source)
        elif choice == "q8_0":
            engine = LlamaCppQ80Engine(settings)
            engine.prepare()
            path, name = engine.path(), "llama.cpp Q8_0"
        else:
            path, name = choice, "llama.cpp " + os.path.basename(choice)
        scorer = LlamaCppLogits(path, max_tokens=args.sequence_length + 1)
        try:
            results[name] = perplexity_and_fidelity(scorer, lm.model, batches)
        finally:
            scorer.close()
        results[name]["file"] = os.path.basename(path)
    print(json.dumps({"model": args.model, "tokens": args.tokens, "results": results},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
