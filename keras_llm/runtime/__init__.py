"""The runtime: one engine behind every entry point, over a small backend contract.

    params.py     SamplingParams, validated in one place
    sampling.py   next-token choice on the host (numpy)
    sequence.py   stop ids, stop strings, lengths, UTF-8-safe streaming text
    engine.py     slots, queue and scheduler over one backend
    backend.py    the contract backends implement
    litert.py     LiteRT/XNNPACK backend (CPU default; no TensorFlow import)
    xla.py        XLA backend (GPU/TPU, and the fallback)
    recompute.py  generic backend: any causal Keras LM, full sequence per step
    tokenizer.py  the host tokenizer (Hugging Face `tokenizers`)
    user_tokenizer.py  any tokenizer (encode/decode) seen as a host tokenizer
    artifacts.py  where compiled files live and when they are rebuilt

Nothing imported here loads TensorFlow except `xla`, `recompute` (and the converter
`artifacts.build_litert` calls).
"""
