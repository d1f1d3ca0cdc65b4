"""Model hyper-parameters: one dataclass, the published configs by name, and HF `config.json` in and out."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from minalign.data import read_json_object, short_repr


# The sizes every model needs to be a positive integer (bool is an int in Python, but not a size).
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
OPTIONAL_POSITIVE_INTS = ("head_dim", "sliding_window")  # or None: derived / no window
# No real model comes near it, and a weight's size (the product of two) still fits torch's int64 sizes.
MAX_SIZE = 2**31 - 1


def _is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """An int or float (not a bool) that a float can hold: not NaN, not infinite, not a 400-digit int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Mistral (dense) or Mixtral (sparse MoE) decoder; field names follow HF's config.json."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # each token sees itself and the previous sliding_window - 1 tokens
    num_local_experts: int = 0  # 0 = dense Mistral MLP; > 0 = Mixtral sparse MoE
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        self._check_types()
        if self.head_dim is None:  # frozen dataclass: fill the derived default through object.__setattr__
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) does not divide hidden_size "
                                 f"({self.hidden_size}); give head_dim to set the head size")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_local_experts "
                             f"({self.num_local_experts})")

    def _check_types(self):
        """ValueError naming the first field whose value no model can have (a string size, 0 heads, 2.5 layers)."""
        for name in POSITIVE_INTS + OPTIONAL_POSITIVE_INTS:
            value = getattr(self, name)
            if not (_is_int(value) and 0 < value <= MAX_SIZE or value is None and name in OPTIONAL_POSITIVE_INTS):
                raise ValueError(f"{name} must be a positive integer below 2**31, got {short_repr(value)}")
        if not (_is_int(self.num_local_experts) and 0 <= self.num_local_experts <= MAX_SIZE):
            raise ValueError(f"num_local_experts must be 0 (dense) or a positive integer below 2**31, got "
                             f"{short_repr(self.num_local_experts)}")
        if not _is_int(self.num_experts_per_tok):
            raise ValueError(f"num_experts_per_tok must be an integer, got {short_repr(self.num_experts_per_tok)}")
        for name, least in (("rms_norm_eps", "positive"), ("rope_theta", "positive"),
                            ("router_aux_loss_coef", "non-negative")):
            value = getattr(self, name)
            if not (_is_finite(value) and (value > 0 or least == "non-negative" and value == 0)):
                raise ValueError(f"{name} must be a {least} finite number, got {short_repr(value)}")
            object.__setattr__(self, name, float(value))  # 10000 and 10000.0 are one config
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not (value is None or _is_int(value)):
                raise ValueError(f"{name} must be an integer or null, got {short_repr(value)}")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def replace(self, **changes) -> ModelConfig:
        """A copy with fields changed; a head_dim that was derived is derived again from the new sizes."""
        if "head_dim" not in changes and self.head_dim == self.hidden_size // self.num_attention_heads:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)


_MISTRAL_7B = ModelConfig(sliding_window=4096, max_position_embeddings=32768)
CONFIGS: dict[str, ModelConfig] = {
    # mistralai/Mistral-7B-v0.1
    "mistral-7b-v0.1": _MISTRAL_7B,
    # ibm/merlinite-7b(-pt): Mistral-7B-v0.1 plus 5 added tokens (<|endoftext|>=32000, <|pad|>=32001, ...) in a
    # vocabulary padded to 32008. Its config keeps eos_token_id=2; the chat template ends turns with <|endoftext|>.
    "merlinite-7b": _MISTRAL_7B.replace(vocab_size=32008, pad_token_id=32001),
    # mistralai/Mistral-7B-Instruct-v0.2: no sliding window, rope_theta 1e6
    "mistral-7b-instruct-v0.2": _MISTRAL_7B.replace(sliding_window=None, rope_theta=1e6),
    # mistralai/Mixtral-8x7B-v0.1 and -Instruct-v0.1 share the architecture
    "mixtral-8x7b": ModelConfig(rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
    # tiny configs for tests and the CPU demo; same code paths, small numbers
    "tiny-mistral": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                sliding_window=16),
    "tiny-mixtral": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                sliding_window=16, rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named config, optionally with fields replaced."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name].replace(**overrides)


# What transformers' MistralConfig / MixtralConfig assume for a key config.json leaves out, so that a sparse
# hand-written config builds the same model in both.
HF_DEFAULTS = {
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=1e4,
                    sliding_window=4096, num_local_experts=0),
    "mixtral": dict(num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, rope_theta=1e6,
                    sliding_window=None, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
}


def read_config_json(hf: dict | str | Path) -> tuple[dict, str]:
    """(the config dict, a name for error messages) from a dict or the path of a config.json."""
    if isinstance(hf, dict):
        return hf, "config"
    return read_json_object(hf), str(hf)


def from_hf_config(hf: dict | str | Path) -> ModelConfig:
    """A ModelConfig from an HF config.json (a dict or a path), for model_type mistral or mixtral."""
    hf, source = read_config_json(hf)
    model_type = hf.get("model_type")
    if model_type is None:
        raise ValueError(f"{source}: no model_type key (expected \"mistral\" or \"mixtral\")")
    if model_type not in ("mistral", "mixtral"):
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (mistral or mixtral)")
    if hf.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings=true is not supported (Mistral/Mixtral have an untied lm_head)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    # Published checkpoints say rope_theta; newer transformers writes rope_parameters={"rope_theta", "rope_type"}.
    rope_key = next((k for k in ("rope_parameters", "rope_scaling") if hf.get(k)), None)
    rope = hf[rope_key] if rope_key else {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: {rope_key} must be an object, got {short_repr(rope)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only the default RoPE)")
    defaults = HF_DEFAULTS[model_type]
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope_theta"}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    kwargs = {k: hf[k] for k in fields if k in hf}
    for k, v in defaults.items():
        if k != "rope_theta":
            kwargs.setdefault(k, v)
    if model_type == "mistral":
        kwargs["num_local_experts"] = 0  # a dense model, whatever else the file says
    for k in ("bos_token_id", "eos_token_id"):  # HF allows a list of ids; the first is the canonical one
        if isinstance(kwargs.get(k), list):
            if not kwargs[k]:
                raise ValueError(f"{source}: {k} is an empty list")
            kwargs[k] = kwargs[k][0]
    try:
        return ModelConfig(rope_theta=rope_theta, **kwargs)
    except ValueError as e:  # a value no model can have: the message names its key
        raise ValueError(f"{source}: {e}") from None


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The HF config.json dict for cfg, in the key layout of the published checkpoints (transformers reads both)."""
    hf = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
        "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")}
    hf.update(hidden_act="silu", tie_word_embeddings=False, attention_dropout=0.0, torch_dtype=dtype,
              initializer_range=0.02, use_cache=True)
    if cfg.is_moe:
        hf.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=cfg.num_local_experts,
                  num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef,
                  output_router_logits=False, router_jitter_noise=0.0)
    else:
        hf.update(model_type="mistral", architectures=["MistralForCausalLM"])
    return hf
