"""Tiny random models of every supported family, built locally for the per-architecture correctness suite.

`TINY_MODELS` is a registry: test id -> `TinyModel` (the model_type, a function returning a tiny config, the class
to load it with, whether the family is pre-norm or has post-norms after its sublayers). Builders use 2
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
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


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


def _falcon(**overrides: Any) -> PretrainedConfig:
    return AutoConfig.for_model("falcon", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)


def _gemma3_multimodal() -> PretrainedConfig:
    text = {**SMALL, "model_type": "gemma3_text", "sliding_window": 8}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---- dense families ----------------------------------------------------------------------------------------------
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
    dense("ernie4_5"), dense("internlm3"), dense("jais2"), dense("iquestcoder"), dense("cwm", sliding_window=8),
    dense("vaultgemma"), dense("granite_swa", sliding_window=8), dense("hyperclovax", pre_norm=False),
    dense("nanochat"),
    dense("minicpm3", num_key_value_heads=4, head_dim=None, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
          qk_rope_head_dim=4, v_head_dim=8),
    TinyModel("falcon", "falcon", _falcon),
    TinyModel("falcon-new-decoder", "falcon", lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2)),
    TinyModel("gpt_neox", "gpt_neox", _gpt_neox),
    TinyModel("gpt2", "gpt2", _gpt2),
    TinyModel("gemma3", "gemma3", _gemma3_multimodal, model_class="Gemma3ForConditionalGeneration", pre_norm=False),
):
    register_tiny(_tiny)


# ---- MoE, hybrid and multimodal families -------------------------------------------------------------------------
# Two layers each, so that where a family mixes layer kinds both appear: a dense and an MoE layer (mlp_only_layers,
# first_k_dense_replace, interleave_moe_layer_step...), a linear-attention / Mamba / short-convolution layer and a
# full-attention one. 4 experts with inter 16; gpt-oss and Llama 4 experts are square (inter = d_model = 32), as real
# gpt-oss's are, so a wrong orientation passes every shape check and only the residual test can catch it.
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
ROUTED_AND_SHARED = {"n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 16,
                     "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
LINEAR_ATTENTION = {"layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4,
                    "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}
GRANITE_HYBRID = {"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8,
                  "mamba_n_groups": 1, "mamba_expand": 2, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                  "logits_scaling": 2.0, "shared_intermediate_size": 32, "intermediate_size": 16}
GEMMA4 = {"head_dim": 8, "global_head_dim": 8, "layer_types": ["sliding_attention", "full_attention"],
          "sliding_window": 8}

for _tiny in (
    dense("qwen2_moe", **MOE, shared_expert_intermediate_size=32, mlp_only_layers=[0]),
    dense("qwen3_moe", **MOE, mlp_only_layers=[0]),
    dense("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    dense("phimoe", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    dense("minimax_m2", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    dense("olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=16),
    dense("flex_olmo", pre_norm=False, num_experts=4, num_experts_per_tok=2, intermediate_size=16),
    dense("hunyuan_v1_moe", num_experts=4, moe_topk=2, num_shared_expert=1, moe_intermediate_size=16),
    dense("deepseek_v2", **ROUTED_AND_SHARED, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4),
    dense("gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=8,
          layer_types=["sliding_attention", "full_attention"]),
    dense("llama4_text", num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=64,
          interleave_moe_layer_step=2),
    dense("deepseek_v3", **ROUTED_AND_SHARED, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4),  # head_dim: the rotary part
    dense("glm4_moe", **ROUTED_AND_SHARED),
    dense("ernie4_5_moe", moe_num_experts=4, moe_num_shared_experts=1, moe_intermediate_size=16,
          moe_layer_start_index=1, moe_k=2, use_bias=True),  # tied, biases on every projection
    dense("qwen3_next", **MOE, **LINEAR_ATTENTION, shared_expert_intermediate_size=16, mlp_only_layers=[0]),
    dense("qwen3_5_text", **LINEAR_ATTENTION),
    dense("qwen3_5_moe_text", **MOE, **LINEAR_ATTENTION, shared_expert_intermediate_size=16),
    dense("granitemoehybrid", **GRANITE_HYBRID, num_local_experts=4, num_experts_per_tok=2),
    dense("granitemoehybrid", "granitemoehybrid-dense", **GRANITE_HYBRID, num_local_experts=0),
    dense("granitemoe", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    dense("granitemoeshared", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
          shared_intermediate_size=32),
    dense("lfm2", layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
    dense("jamba", num_experts=4, num_experts_per_tok=2, intermediate_size=16, attn_layer_period=2, attn_layer_offset=1,
          expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False),
    dense("bamba", attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1),
    dense("lfm2_moe", layer_types=["conv", "full_attention"], num_dense_layers=1, **MOE),
    # Gemma 4 dense with per-layer inputs (like E2B/E4B) and MoE without them (like 26B-A4B): sandwich norms.
    dense("gemma4_text", pre_norm=False, **GEMMA4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB),
    dense("gemma4_text", "gemma4_text-moe", pre_norm=False, **GEMMA4, hidden_size_per_layer_input=0,
          enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
):
    register_tiny(_tiny)

# Multimodal wrappers: only the language model may change; the vision tower and projector are copied bit-identical.
# Special token ids sit at the top of the tiny vocabulary, above the ids the tests feed.
_MM_IDS = {"image_token_id": VOCAB - 1, "video_token_id": VOCAB - 2, "vision_start_token_id": VOCAB - 3,
           "vision_end_token_id": VOCAB - 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_QWEN_VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32}
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}


def _wrapper(model_type: str, text: dict, vision: dict, **extra: Any) -> Callable[[], PretrainedConfig]:
    return lambda: AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **extra)


_MM_TINY = {
    "mistral3": ("Mistral3ForConditionalGeneration", _wrapper(
        "mistral3", {**SMALL, "model_type": "mistral"},
        {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 8}, image_token_index=VOCAB - 1)),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", _wrapper(
        "qwen2_vl", {**SMALL, "rope_parameters": _MROPE},
        {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 1}, **_MM_IDS)),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", _wrapper(
        "qwen2_5_vl", {**SMALL, "rope_parameters": _MROPE}, {**_QWEN_VISION, "fullatt_block_indexes": [0]},
        **_MM_IDS)),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", _wrapper(
        "qwen3_vl", {**SMALL, "rope_parameters": {**_MROPE, "mrope_interleaved": True}},
        {**_QWEN_VISION, "deepstack_visual_indexes": [0]}, **_MM_IDS)),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", _wrapper(
        # inter 8: with 16, gate_up [experts, 2 * inter, d_model] would be square and load untransposed.
        "qwen3_vl_moe", {**SMALL, **MOE, "moe_intermediate_size": 8, "mlp_only_layers": [0],
                         "rope_parameters": {**_MROPE, "mrope_interleaved": True}},
        {**_QWEN_VISION, "deepstack_visual_indexes": [0]}, **_MM_IDS)),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", _wrapper(
        "qwen3_5", {**SMALL, **LINEAR_ATTENTION}, _QWEN_VISION, **_MM_IDS)),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", _wrapper(
        "qwen3_5_moe", {**SMALL, **LINEAR_ATTENTION, **MOE, "shared_expert_intermediate_size": 16}, _QWEN_VISION,
        **_MM_IDS)),
    "gemma4": ("Gemma4ForConditionalGeneration", _wrapper(
        "gemma4", {**SMALL, **GEMMA4, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB},
        {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "head_dim": 8}, audio_config=None, image_token_id=VOCAB - 1, boi_token_id=VOCAB - 2,
        eoi_token_id=VOCAB - 3, video_token_id=VOCAB - 4, audio_token_id=VOCAB - 5, boa_token_id=VOCAB - 6,
        eoa_token_index=VOCAB - 7)),
}
_CLIP = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "projection_dim": 16}
_INTERNVL_VISION = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "image_size": [28, 28], "patch_size": [14, 14]}
_MM_TINY.update({  # LLaVA-layout wrappers take their writers from the language model's family: llama and gemma2
    "llava": ("LlavaForConditionalGeneration", _wrapper(
        "llava", {**SMALL, "model_type": "llama"}, _CLIP, image_token_index=VOCAB - 1)),
    "llava-gemma2": ("LlavaForConditionalGeneration", _wrapper(
        "llava", {**SMALL, "model_type": "gemma2", "sliding_window": 8}, _CLIP, image_token_index=VOCAB - 1)),
    "internvl": ("InternVLForConditionalGeneration", _wrapper(
        "internvl", {**SMALL, "model_type": "qwen2"}, _INTERNVL_VISION, image_token_id=VOCAB - 1)),
})
_MM_MODEL_TYPE = {"llava-gemma2": "llava"}
_MM_POST_NORM = {"gemma4", "llava-gemma2"}
for _name, (_class, _make) in _MM_TINY.items():
    register_tiny(TinyModel(_name, _MM_MODEL_TYPE.get(_name, _name), _make, model_class=_class,
                            pre_norm=_name not in _MM_POST_NORM))


def llama4_multimodal_config() -> PretrainedConfig:
    """Llama 4 with its vision tower (Llama4ForConditionalGeneration): dense + MoE text layers, square experts."""
    text = {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size": 32,
            "intermediate_size_mlp": 64, "interleave_moe_layer_step": 2}
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "vision_output_dim": 16, "projector_input_dim": 16,
              "projector_output_dim": 16, "pixel_shuffle_ratio": 0.5}
    return AutoConfig.for_model("llama4", text_config=text, vision_config=vision, image_token_index=VOCAB - 1,
                                boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2)


# Supported families that the generic suite cannot drive, with the test that covers them instead.
# Llama4ForConditionalGeneration.forward fails in transformers 5.24 (it reads `image_outputs` from its language
# model's output), so its language model (model.language_model, a Llama4ForCausalLM) is checked directly.
TESTED_ELSEWHERE = {"llama4": "tests/test_architectures_moe.py::test_llama4_multimodal_edits_only_its_language_model"}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight tensor of a saved checkpoint folder (every *.safetensors at its top is a weight shard)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors
