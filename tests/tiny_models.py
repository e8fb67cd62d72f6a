"""Tiny random models of every supported family, built locally for the per-architecture correctness suite.

`TINY_MODELS` is a registry: test id -> `TinyModel` (the model_type, a function returning a tiny config, the class
to load it with, whether the family is pre-norm so hooked ablation must equal the weight edit). Builders use 2
layers, d_model 32 and a 128-token vocabulary, with non-zero biases where the family has them and tied and untied
variants where relevant. `build_tiny` randomizes every bias and norm gain (fresh models have zero biases and unit
gains, which would hide mistakes in the bias and post-norm edits). Engineer C registers MoE, hybrid and multimodal
builders in their own block at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


@dataclass(frozen=True)
class TinyModel:
    """How to build one tiny test model."""

    name: str
    model_type: str
    make_config: Callable[[], PretrainedConfig]
    model_class: str = "AutoModelForCausalLM"
    pre_norm: bool = True


TINY_MODELS: dict[str, TinyModel] = {}


def register_tiny(tiny: TinyModel) -> None:
    """Add a builder to the registry (names are unique test ids)."""
    if tiny.name in TINY_MODELS:
        raise ValueError(f"tiny model {tiny.name} registered twice")
    TINY_MODELS[tiny.name] = tiny


def dense(model_type: str, name: str = "", pre_norm: bool = True, **overrides: Any) -> TinyModel:
    """A tiny model of a family whose config takes the usual Llama-style size keys."""
    return TinyModel(name or model_type, model_type,
                     lambda: AutoConfig.for_model(model_type, **{**SMALL, **overrides}), pre_norm=pre_norm)


def model_class(tiny: TinyModel) -> Any:
    """The transformers class that loads this tiny model (AutoModelForCausalLM unless a wrapper needs its own)."""
    return getattr(transformers, tiny.model_class)


def build_tiny(name: str, seed: int = 0) -> PreTrainedModel:
    """The registered tiny model `name` in float32 eval mode, with random biases and norm gains."""
    tiny = TINY_MODELS[name]
    torch.manual_seed(seed)
    cls = model_class(tiny)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto classes vs model classes
    model = build(tiny.make_config(), dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
            elif param_name.endswith(("weight", "bias")):
                param.add_(0.2 * torch.randn_like(param))  # unit gains -> 1 +- 0.2, zero biases -> non-zero
    return model.eval()


def save_tiny(model: PreTrainedModel, out_dir: Path, max_shard_size: str | None = None) -> Path:
    """Save as transformers does (safetensors; several shards when `max_shard_size` is small)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def _gpt2(**overrides: Any) -> PretrainedConfig:
    return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)


def _gpt_neox() -> PretrainedConfig:
    return AutoConfig.for_model("gpt_neox", **{**SMALL, "rotary_pct": 0.5})


def _gemma3_multimodal() -> PretrainedConfig:
    text = {**SMALL, "model_type": "gemma3_text", "sliding_window": 8}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---- dense families (engineer B) ----------------------------------------------------------------------------------
for _tiny in (
    dense("llama", attention_bias=True, mlp_bias=True),
    dense("llama", "llama-tied", tie_word_embeddings=True),
    dense("mistral"), dense("ministral"),
    dense("qwen2"),  # q/k/v biases
    dense("qwen3"), dense("qwen3", "qwen3-tied", tie_word_embeddings=True),
    dense("gemma"),  # tied, (1 + w) pre-norms, scaled embedding
    dense("gemma2", pre_norm=False, sliding_window=8),
    dense("gemma3_text", pre_norm=False, sliding_window=8),
    dense("olmo2", pre_norm=False), dense("olmo3", pre_norm=False, sliding_window=8),
    dense("exaone4", pre_norm=False, sliding_window=8),
    dense("glm4", pre_norm=False, partial_rotary_factor=0.5),
    dense("phi3"), dense("granite"), dense("cohere"), dense("cohere2", sliding_window=8),
    dense("smollm3"), dense("glm"), dense("seed_oss"), dense("hunyuan_v1_dense"), dense("helium"), dense("arcee"),
    dense("nemotron"), dense("apertus"), dense("stablelm"), dense("olmo"), dense("starcoder2", use_bias=True),
    dense("phi", partial_rotary_factor=0.5),
    TinyModel("gpt_neox", "gpt_neox", _gpt_neox),
    TinyModel("gpt2", "gpt2", _gpt2),
    TinyModel("gemma3", "gemma3", _gemma3_multimodal, model_class="Gemma3ForConditionalGeneration", pre_norm=False),
):
    register_tiny(_tiny)
