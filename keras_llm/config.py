"""Hyperparameters of a Llama-family decoder and a table of named configs."""

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Every hyperparameter of a Llama-family decoder-only transformer.

    Args:
        vocabulary_size: number of token ids.
        hidden_dim: width of the residual stream.
        num_layers: number of decoder blocks.
        num_query_heads: attention heads for queries.
        num_key_value_heads: heads for keys and values (grouped-query
            attention when smaller than `num_query_heads`).
        head_dim: width of one head.
        intermediate_dim: width of the SwiGLU MLP.
        rope_theta: base of the rotary position embedding.
        rms_norm_epsilon: epsilon of RMSNorm.
        context_length: longest sequence the model is used for.
        tie_word_embeddings: reuse the token embedding as the output head.
        attention_bias: the query, key and value projections have a bias
            (Qwen2).
        mlp_activation: activation of the gated MLP's gate: "silu" (SwiGLU)
            or "gelu_tanh" (GeGLU with the tanh approximation, Gemma).
        norm_weight_offset: RMSNorm multiplies by `offset + weight` (Gemma
            stores its norm weights as `weight - 1`: 1.0).
        embedding_scale: factor on the looked-up token embeddings (Gemma:
            `sqrt(hidden_dim)`); None for none. The tied output head uses the
            unscaled table.
        rope_scaling: None, or Llama 3.1's RoPE rescaling as a dict
            (`rope_type` "llama3", `factor`, `low_freq_factor`,
            `high_freq_factor`, `original_max_position_embeddings`).

    Example:
        >>> cfg = LlamaConfig.named("tiny")
        >>> cfg.num_layers
        2
    """

    vocabulary_size: int
    hidden_dim: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_dim: int
    rope_theta: float = 10000.0
    rms_norm_epsilon: float = 1e-5
    context_length: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_activation: str = "silu"
    norm_weight_offset: float = 0.0
    embedding_scale: float | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        for field in ("vocabulary_size", "hidden_dim", "num_layers",
                      "num_query_heads", "num_key_value_heads", "head_dim",
                      "intermediate_dim", "context_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.num_query_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_query_heads ({self.num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"rope_scaling must be None or of rope_type 'llama3', "
                             f"got {self.rope_scaling!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS}, "
                             f"got {self.mlp_activation!r}")

    @property
    def query_groups(self):
        return self.num_query_heads // self.num_key_value_heads

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**values)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def named(cls, name):
        """Return one of the configs in `NAMED_CONFIGS`."""
        try:
            return cls(**NAMED_CONFIGS[name])
        except KeyError:
            raise ValueError(
                f"unknown config {name!r}; known: {sorted(NAMED_CONFIGS)}"
            ) from None


MLP_ACTIVATIONS = ("silu", "gelu_tanh")

NAMED_CONFIGS = {
    # A few thousand parameters: the fast test suite builds this one.
    "tiny": dict(vocabulary_size=300, hidden_dim=16, num_layers=2,
                 num_query_heads=4, num_key_value_heads=2, head_dim=4,
                 intermediate_dim=32, rope_theta=10000.0,
                 context_length=256, tie_word_embeddings=True),
    "smollm2-135m": dict(vocabulary_size=49152, hidden_dim=576, num_layers=30,
                         num_query_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_dim=1536, rope_theta=100000.0,
                         rms_norm_epsilon=1e-5, context_length=8192,
                         tie_word_embeddings=True),
}
