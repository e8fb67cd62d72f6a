"""The MoE, hybrid and multimodal entries of the architecture table (see `abliterate.architectures`).

Each entry was checked against the installed transformers 5 modeling code and against what `save_pretrained` writes.
Two things make these families harder than the dense ones:

- Experts are stored two ways. transformers 5 fuses them in memory into 3-D tensors, but `save_pretrained` (and the
  Hub checkpoints of Mixtral, Qwen MoE, DeepSeek, GLM, ERNIE, LFM2) store one 2-D `down_proj` (or `w2`) per expert;
  gpt-oss, Llama 4, Granite 4 and Gemma 4 store the fused tensor. Every entry claims both names, because `plan_edits`
  also runs on in-memory names for the hooks. Fused `down_proj` is [experts, d_model, inter] in most families but
  [experts, inter, d_model] in gpt-oss and Llama 4, whose forward computes h @ down_proj[e]; real gpt-oss experts are
  square (inter = d_model = 2880), so the orientation is written here, never read from the shape.
- Hybrids have more writers: gated delta-net `linear_attn.out_proj` (Qwen3-Next, Qwen 3.5), Mamba `mamba.out_proj`
  (Granite 4, Jamba, Bamba), short-convolution `conv.out_proj` (LFM2), and Gemma 4's per-layer-input
  `per_layer_projection`.

Norms: every family here is pre-norm (the norm before a sublayer never touches what it writes), except FlexOlmo
(OLMo 2's post-norms, gain `weight`) and Gemma 4, whose norm gain is `weight` too (not Gemma 2/3's 1 + weight) and
whose MoE layers nest post-norms: the dense MLP passes
post_feedforward_layernorm_1, the experts post_feedforward_layernorm_2, and their sum post_feedforward_layernorm, so
each writer is made orthogonal to normalize(g_inner * g_outer * r). Scalars on the residual branches (Granite's
residual_multiplier, Gemma 4's layer_scalar, gated shared experts) do not change orthogonality.

Refused: MiniMax-Text-01 (its residual is re-normalized in every layer) here, Gemma 3n (AltUp: not one residual
stream) in `abliterate.architectures.dense`. LLaVA-style wrappers delegate to their language model's own entry.
"""

from __future__ import annotations

import dataclasses

from abliterate.architectures.schema import (
    ATTN_O,
    AXIS_FROM_SHAPE,
    CAUSAL_LM,
    EMBED,
    MLP_DOWN,
    Architecture,
    EntryTable,
    Layout,
    WriterRule,
)

ENTRIES = EntryTable()
register = ENTRIES.register

# Multimodal wrappers: transformers 5 names the language model model.language_model.* with lm_head at the top;
# older (LLaVA-style) Hub checkpoints store language_model.model.* and language_model.lm_head.
WRAPPED = (Layout("model.language_model."), Layout("language_model.model.", "language_model.lm_head.weight"))


def _experts(block: str, per_expert: str, fused_axis: int = 1) -> tuple[WriterRule, ...]:
    """Routed experts' down projections in both on-disk layouts: one 2-D tensor per expert, or one fused 3-D tensor.

    `per_expert` is the per-expert down projection's name inside `{block}.experts.N.` (down_proj or w2).
    """
    return (WriterRule(rf"{block}\.experts\.\d+\.{per_expert}\.(weight|bias)", "mlp", "linear"),
            WriterRule(rf"{block}\.experts\.down_proj", "mlp", "experts_fused", d_model_axis=fused_axis))


def _linear(pattern: str, role: str = "mlp") -> WriterRule:
    """A plain nn.Linear writer (weight and, where the family has one, bias)."""
    return WriterRule(rf"{pattern}\.(weight|bias)", role, "linear")


# Qwen2-MoE style: dense layers keep mlp.down_proj (mlp_only_layers / decoder_sparse_step / first_k_dense_replace),
# MoE layers have routed experts plus, in most families, a shared expert (qwen: shared_expert, gated by a sigmoid;
# deepseek/glm/ernie: shared_experts).
QWEN_MOE_MLP = (MLP_DOWN, *_experts("mlp", "down_proj"), _linear(r"mlp\.shared_expert\.down_proj"))
DEEPSEEK_MOE_MLP = (MLP_DOWN, *_experts("mlp", "down_proj"), _linear(r"mlp\.shared_experts\.down_proj"))
LINEAR_ATTN_OUT = _linear(r"linear_attn\.out_proj", "mixer")

for _model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, (EMBED, ATTN_O, *QWEN_MOE_MLP)))

# DeepSeek V3 (MLA attention still writes through o_proj; first_k_dense_replace dense layers; FP8 Hub weights are
# refused by the checkpoint writer's dtype check), GLM-4.5 MoE and ERNIE 4.5 MoE (tied, optional biases).
for _model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, (EMBED, ATTN_O, *DEEPSEEK_MOE_MLP)))

# Hunyuan MoE: a shared MLP named shared_mlp beside the routed experts.
register("hunyuan_v1_moe", Architecture("hunyuan_v1_moe", CAUSAL_LM, (
    EMBED, ATTN_O, MLP_DOWN, *_experts("mlp", "down_proj"), _linear(r"mlp\.shared_mlp\.down_proj"))))

# FlexOlmo: OLMo 2's sandwich norms (gain = weight) around attention and the experts.
register("flex_olmo", Architecture("flex_olmo", CAUSAL_LM, (
    EMBED, WriterRule(ATTN_O.pattern, "mixer", "linear", post_norms=("post_attention_layernorm.weight",)),
    *(dataclasses.replace(rule, post_norms=("post_feedforward_layernorm.weight",))
      for rule in _experts("mlp", "down_proj")))))

# Mixtral, PhiMoE and MiniMax-M2: the Hub (and save_pretrained) store block_sparse_moe.experts.N.w2; transformers 5
# renames the block to mlp and fuses the experts in memory.
for _model_type in ("mixtral", "phimoe", "minimax_m2"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, (
        EMBED, ATTN_O, WriterRule(r"block_sparse_moe\.experts\.\d+\.w2\.weight", "mlp", "linear"),
        WriterRule(r"mlp\.experts\.down_proj", "mlp", "experts_fused", d_model_axis=1))))

# gpt-oss: biases everywhere (o_proj, experts), fused [experts, inter, d_model] experts with a fused bias
# [experts, d_model]; attention sinks are per-head logits, not residual writers. MXFP4 checkpoints store
# down_proj_blocks/_scales instead of down_proj: plan_edits refuses them by name (use a BF16 release).
register("gpt_oss", Architecture("gpt_oss", CAUSAL_LM, (
    EMBED, ATTN_O, WriterRule(r"mlp\.experts\.down_proj", "mlp", "experts_fused", d_model_axis=2),
    WriterRule(r"mlp\.experts\.down_proj_bias", "mlp", "experts_bias"))))

# Llama 4 text: dense feed_forward layers and MoE layers (interleave_moe_layer_step) with fused
# [experts, inter, d_model] experts and a shared expert. The multimodal wrapper edits only its language model.
LLAMA4_WRITERS = (EMBED, ATTN_O, _linear(r"feed_forward\.down_proj"),
                  WriterRule(r"feed_forward\.experts\.down_proj", "mlp", "experts_fused", d_model_axis=2),
                  _linear(r"feed_forward\.shared_expert\.down_proj"))
register("llama4_text", Architecture("llama4_text", CAUSAL_LM, LLAMA4_WRITERS))
register("llama4", Architecture("llama4", WRAPPED, LLAMA4_WRITERS, text_config_key="text_config"))

# Qwen3-Next and Qwen 3.5: hybrid layers (gated delta-net linear attention or gated full attention), both writing
# through an output projection; Qwen 3.5 text may be stored under the multimodal prefix (transformers strips it).
register("qwen3_next", Architecture("qwen3_next", CAUSAL_LM, (EMBED, ATTN_O, LINEAR_ATTN_OUT, *QWEN_MOE_MLP)))
QWEN35_TEXT = (CAUSAL_LM[0], Layout("model.language_model."))
register("qwen3_5_text", Architecture("qwen3_5_text", QWEN35_TEXT, (EMBED, ATTN_O, LINEAR_ATTN_OUT, MLP_DOWN)))
register("qwen3_5_moe_text", Architecture(
    "qwen3_5_moe_text", QWEN35_TEXT, (EMBED, ATTN_O, LINEAR_ATTN_OUT, *QWEN_MOE_MLP)))
register("qwen3_5", Architecture(
    "qwen3_5", WRAPPED, (EMBED, ATTN_O, LINEAR_ATTN_OUT, MLP_DOWN), text_config_key="text_config"))
register("qwen3_5_moe", Architecture(
    "qwen3_5_moe", WRAPPED, (EMBED, ATTN_O, LINEAR_ATTN_OUT, *QWEN_MOE_MLP), text_config_key="text_config"))

# Granite 4 (granitemoehybrid): Mamba-2 or attention mixers; MoE experts (on disk block_sparse_moe.output_linear,
# fused [experts, d_model, inter]; in memory block_sparse_moe.experts.down_proj) plus an always-on shared_mlp.
GRANITE_MLP = (WriterRule(r"block_sparse_moe\.output_linear\.weight", "mlp", "experts_fused", d_model_axis=1),
               WriterRule(r"block_sparse_moe\.experts\.down_proj", "mlp", "experts_fused", d_model_axis=1),
               _linear(r"shared_mlp\.output_linear"))
register("granitemoehybrid", Architecture("granitemoehybrid", CAUSAL_LM, (
    EMBED, ATTN_O, _linear(r"mamba\.out_proj", "mixer"), *GRANITE_MLP)))
register(("granitemoe", "granitemoeshared"), Architecture("granitemoe", CAUSAL_LM, (EMBED, ATTN_O, *GRANITE_MLP)))

# LFM2: short-convolution (conv.out_proj) or attention (self_attn.out_proj) mixers, SwiGLU feed_forward.w2, tied;
# its final norm is called embedding_norm (applied after the last layer). LFM2-MoE adds per-expert w2.
LFM2_WRITERS = (EMBED, _linear(r"conv\.out_proj", "mixer"), _linear(r"self_attn\.out_proj", "mixer"),
                _linear(r"feed_forward\.w2"))
register("lfm2", Architecture("lfm2", CAUSAL_LM, LFM2_WRITERS, final_norm="embedding_norm"))
register("lfm2_moe", Architecture(
    "lfm2_moe", CAUSAL_LM, (*LFM2_WRITERS, *_experts("feed_forward", "w2")), final_norm="embedding_norm"))

# Gemma 4: every sublayer sits behind a post-norm with gain `weight`; the MoE flag nests a second post-norm after
# the dense MLP and gives the experts their own (see the module docstring). The per-layer-input projection adds
# into the residual through post_per_layer_input_norm. Tied.
_FFN = "post_feedforward_layernorm.weight"
GEMMA4_WRITERS = (
    EMBED,
    WriterRule(ATTN_O.pattern, "mixer", "linear", post_norms=("post_attention_layernorm.weight",)),
    WriterRule(MLP_DOWN.pattern, "mlp", "linear", post_norms=(_FFN,), when="!enable_moe_block"),
    WriterRule(MLP_DOWN.pattern, "mlp", "linear", post_norms=("post_feedforward_layernorm_1.weight", _FFN),
               when="enable_moe_block"),
    WriterRule(r"experts\.down_proj", "mlp", "experts_fused", d_model_axis=1,
               post_norms=("post_feedforward_layernorm_2.weight", _FFN), when="enable_moe_block"),
    WriterRule(r"per_layer_projection\.weight", "extra", "linear", post_norms=("post_per_layer_input_norm.weight",)),
)
register("gemma4_text", Architecture("gemma4_text", CAUSAL_LM, GEMMA4_WRITERS))
register("gemma4", Architecture("gemma4", WRAPPED, GEMMA4_WRITERS, text_config_key="text_config"))

# Llama-style language models inside vision wrappers: only the language model is edited.
LLAMA_WRITERS = (EMBED, ATTN_O, MLP_DOWN)
register("mistral3", Architecture("mistral3", WRAPPED, LLAMA_WRITERS, text_config_key="text_config"))
# Qwen2-VL / Qwen2.5-VL Hub checkpoints keep the text model at model.* (vision at visual.*); transformers 5 saves
# model.language_model.*. Qwen3-VL (dense) uses the transformers 5 names on the Hub too.
QWEN_VL = (Layout("model.language_model."), CAUSAL_LM[0])
for _model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
    register(_model_type, Architecture(_model_type, QWEN_VL, LLAMA_WRITERS, text_config_key="text_config"))

# Qwen3-VL-MoE: Hub checkpoints (written by transformers 4) store fused experts as [experts, inter, d_model], while
# transformers 5 holds and saves [experts, d_model, inter] and transposes on load only when the shape disagrees.
# Both occur on disk, so the d_model axis is read from the shape; square experts (none released) are refused.
register("qwen3_vl_moe", Architecture("qwen3_vl_moe", QWEN_VL, (
    EMBED, ATTN_O, MLP_DOWN, WriterRule(r"mlp\.experts\.down_proj", "mlp", "experts_fused",
                                        d_model_axis=AXIS_FROM_SHAPE)), text_config_key="text_config"))

# Jamba and Bamba: Mamba or attention mixers and a feed_forward MLP (Jamba's MoE layers: per-expert on disk), pre-norm,
# final norm final_layernorm.
JAMBA_WRITERS = (EMBED, ATTN_O, _linear(r"mamba\.out_proj", "mixer"), _linear(r"feed_forward\.down_proj"),
                 *_experts("feed_forward", "down_proj"))
for _model_type in ("jamba", "bamba"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, JAMBA_WRITERS, final_norm="final_layernorm"))

# MiniMax-Text-01 keeps a normalized residual: each layer's residual is its input layernorm's OUTPUT, so the stream
# itself passes through norms whose gains turn an r-free vector into one with a component along r.
register("minimax", Architecture("minimax", CAUSAL_LM, (), refuse=(
    "its residual stream is re-normalized inside every layer (the residual is the input layernorm's output), so no "
    "edit of the writers removes a direction exactly; abliterate refuses it rather than edit it approximately.")))

# LLaVA-layout wrappers around a language model of any supported family: the wrapper gives only where the language
# model lives; its writers, norms (Gemma 2's sandwich norms included) and names come from text_config's own entry.
for _model_type in ("llava", "internvl"):
    register(_model_type, Architecture(_model_type, WRAPPED, (), text_config_key="text_config", delegate=True))
