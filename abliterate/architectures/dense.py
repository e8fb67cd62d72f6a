"""The dense entries of the architecture table (see `abliterate.architectures` for the schema and `plan_edits`).

Each entry was checked against the installed transformers 5 modeling code (where each sublayer's output goes before
the residual add) and against what `save_pretrained` writes, and each has a tiny model in tests/tiny_models.py that
tests/test_architectures.py edits end to end. The MoE, hybrid and multimodal entries are in
`abliterate.architectures.moe`.
"""

from __future__ import annotations

from abliterate.architectures.schema import (
    ATTN_O,
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


def _sandwich(attn_norm: str, mlp_norm: str, gain: str) -> tuple[WriterRule, ...]:
    """Writers of a sandwich-norm decoder: each sublayer's output passes its own post-norm before the add."""
    return (EMBED,
            WriterRule(ATTN_O.pattern, "mixer", "linear", post_norms=(f"{attn_norm}.weight",), gain=gain),
            WriterRule(MLP_DOWN.pattern, "mlp", "linear", post_norms=(f"{mlp_norm}.weight",), gain=gain))


# Pre-norm decoders with Llama's on-disk names (embed_tokens, self_attn.o_proj, mlp.down_proj), each checked against
# the installed modeling code: fused qkv/gate_up (phi3, glm), parallel residual (cohere, cohere2, stablelm), scalar
# multipliers on the residual branches (granite, minicpm3), latent attention (minicpm3), (1 + w) pre-norms (gemma,
# nemotron) and parameter-free norms (olmo) change nothing for the edit, because their norms sit before a sublayer,
# not between it and the residual add.
for _model_type in ("llama", "mistral", "ministral", "qwen2", "qwen3", "smollm3", "granite", "seed_oss",
                    "hunyuan_v1_dense", "helium", "arcee", "nemotron", "apertus", "phi3", "glm", "stablelm", "gemma",
                    "olmo", "cohere", "cohere2", "ernie4_5", "internlm3", "jais2", "iquestcoder", "cwm", "vaultgemma",
                    "granite_swa", "minicpm3"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, (EMBED, ATTN_O, MLP_DOWN)))

# Sandwich norms: Gemma 2/3 scale by (1 + weight); OLMo 2/3, EXAONE 4 and GLM-4 by weight.
GEMMA_SANDWICH = _sandwich("post_attention_layernorm", "post_feedforward_layernorm", "one_plus_weight")
register("gemma2", Architecture("gemma2", CAUSAL_LM, GEMMA_SANDWICH))
register("gemma3_text", Architecture("gemma3_text", CAUSAL_LM, GEMMA_SANDWICH))
for _model_type in ("olmo2", "olmo3", "exaone4"):
    register(_model_type, Architecture(
        _model_type, CAUSAL_LM, _sandwich("post_attention_layernorm", "post_feedforward_layernorm", "weight")))
register("glm4", Architecture("glm4", CAUSAL_LM, _sandwich("post_self_attn_layernorm", "post_mlp_layernorm", "weight")))
# HyperCLOVA X: post_norm1/post_norm2 (gain = weight) sit before the residual add; its scalar residual_multiplier does
# not change orthogonality. With use_post_norm false they are absent and the plan stops at the missing norm weight.
register("hyperclovax", Architecture("hyperclovax", CAUSAL_LM, _sandwich("post_norm1", "post_norm2", "weight")))

# Gemma 3 with its vision tower: only the language model is edited. transformers 5 names it
# model.language_model.* (lm_head at the top); older Hub checkpoints use language_model.model.*.
register("gemma3", Architecture(
    "gemma3", (Layout("model.language_model."), Layout("language_model.model.", "language_model.lm_head.weight")),
    GEMMA_SANDWICH, text_config_key="text_config"))

register("starcoder2", Architecture("starcoder2", CAUSAL_LM, (
    EMBED, ATTN_O, WriterRule(r"mlp\.c_proj\.(weight|bias)", "mlp", "linear"))))
# nanochat: Llama-like with a parameter-free RMSNorm right after the embedding (a uniform gain keeps r removed) and
# a two-matrix MLP whose writer is fc2.
register("nanochat", Architecture("nanochat", CAUSAL_LM, (
    EMBED, ATTN_O, WriterRule(r"mlp\.fc2\.(weight|bias)", "mlp", "linear"))))
register("phi", Architecture("phi", CAUSAL_LM, (
    EMBED, WriterRule(r"self_attn\.dense\.(weight|bias)", "mixer", "linear"),
    WriterRule(r"mlp\.fc2\.(weight|bias)", "mlp", "linear")), final_norm="final_layernorm"))

# GPT-NeoX (parallel residual, biases): the Hub stores the output layer as embed_out, transformers 5 as lm_head.
register("gpt_neox", Architecture(
    "gpt_neox", (Layout("gpt_neox.", "embed_out.weight"), Layout("gpt_neox.")),
    (WriterRule(r"embed_in\.weight", "embed", "embedding", scope="global"),
     WriterRule(r"attention\.dense\.(weight|bias)", "mixer", "linear"),
     WriterRule(r"mlp\.dense_4h_to_h\.(weight|bias)", "mlp", "linear")),
    embed="embed_in.weight", final_norm="final_layer_norm"))

# GPT-2: transposed Conv1D writers [d_in, d_model], learned absolute positions (wpe) that also write into the
# residual, tied output layer. The original Hub checkpoint has no `transformer.` prefix.
register("gpt2", Architecture(
    "gpt2", (Layout("transformer."), Layout("")),
    (WriterRule(r"wte\.weight", "embed", "embedding", scope="global"),
     WriterRule(r"wpe\.weight", "embed", "position_embedding", scope="global"),
     WriterRule(r"attn\.c_proj\.(weight|bias)", "mixer", "conv1d"),
     WriterRule(r"mlp\.c_proj\.(weight|bias)", "mlp", "conv1d")),
    embed="wte.weight", layers="h", final_norm="ln_f", n_layers_key="n_layer", d_model_key="n_embd"))

# Falcon (7B/40B/180B; Falcon 3 is Llama): parallel attention and MLP in both its decoder variants.
register("falcon", Architecture(
    "falcon", (Layout("transformer."),),
    (WriterRule(r"word_embeddings\.weight", "embed", "embedding", scope="global"),
     WriterRule(r"self_attention\.dense\.(weight|bias)", "mixer", "linear"),
     WriterRule(r"mlp\.dense_4h_to_h\.(weight|bias)", "mlp", "linear")),
    embed="word_embeddings.weight", layers="h", final_norm="ln_f"))

# Doge rescales the residual elementwise by learned vectors (input_residual, post_attention_residual): a residual
# orthogonal to r stops being so after s * x, so no edit of the writers removes r. Refused rather than approximated.
register("doge", Architecture("doge", CAUSAL_LM, (), refuse=(
    "its residual stream is rescaled elementwise by learned vectors (input_residual), so removing r from the "
    "writers does not remove it from the stream; abliterate refuses it rather than edit it approximately.")))


# Gemma 3n keeps several residual streams (AltUp) and mixes them per layer: removing r from one stream's writers is not
# the paper's edit, and an approximate edit would be silently wrong, so it is refused.
_ALTUP = ("its residual stream is not a single stream (Gemma 3n AltUp keeps several and mixes them), so a "
          "single-direction weight edit would be approximate; abliterate refuses it rather than edit it wrongly.")
for _model_type in ("gemma3n", "gemma3n_text"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, (), refuse=_ALTUP))
