"""Model optimization: pruning (SparseGPT, Wanda, TF-MOT magnitude), int8
weight quantization, distillation, 16-bit precision, quality metrics, and
`run` (the `keras-llm optimize` pipeline).

`QuantizedDense` (the int8 layer) lives in `keras_llm.layers`, so
`tf.keras.models.load_model` reads int8 model files once keras_llm is imported.
"""

from keras_llm.optimize.distill import distill, make_student
from keras_llm.optimize.metrics import perplexity_and_fidelity
from keras_llm.optimize.one_shot import prune_one_shot
from keras_llm.optimize.pipeline import OptimizeOptions, run
from keras_llm.optimize.precision import cast_model
from keras_llm.optimize.pruning import measure_sparsity, prune
from keras_llm.optimize.quantize import (QuantizedDense, dequantized_model, qat_model,
                                         quantization_aware_fine_tune, quantize_kernel,
                                         quantize_model, quantize_weights)

__all__ = [
    "OptimizeOptions",
    "QuantizedDense",
    "cast_model",
    "distill",
    "make_student",
    "dequantized_model",
    "measure_sparsity",
    "perplexity_and_fidelity",
    "prune",
    "prune_one_shot",
    "qat_model",
    "quantization_aware_fine_tune",
    "quantize_kernel",
    "quantize_model",
    "quantize_weights",
    "run",
]
