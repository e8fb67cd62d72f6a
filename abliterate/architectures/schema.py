"""The schema of the architecture table: writer rules, layouts, entries, and the edit plan they produce.

Also the building blocks most entries share (Llama's on-disk names) and `EntryTable`, which the entry modules
fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Roles of residual writers: the token (and position) embedding, the sequence mixer (attention, linear attention,
# Mamba, short convolution), the MLP (dense, experts, shared experts) and anything else added to the residual.
ROLES = ("embed", "mixer", "mlp", "extra")

# Edit kinds and the axis of the stored tensor that lives in d_model (the axis the direction is removed along).
# `linear` is an nn.Linear weight [d_model, d_in] or its bias [d_model]; `conv1d` is GPT-2's transposed Conv1D
# weight [d_in, d_model] (its bias is [d_model]); `embedding` and `position_embedding` are row tables [n, d_model];
# `experts_fused` is a 3-D expert tensor whose d_model axis the rule names (1 for [experts, d_model, inter], 2 for
# gpt-oss and Llama 4's [experts, inter, d_model]: real gpt-oss experts are square, so it cannot be read from the
# shape); `experts_bias` is a fused expert bias [experts, d_model]. AXIS_FROM_SHAPE is for the one family whose Hub
# and transformers-5 checkpoints store the same fused tensor in both orientations (Qwen3-VL-MoE): the axis that is
# d_model wins, and square experts are refused because their orientation cannot be known.
AXIS_FROM_SHAPE = -1
KIND_AXES = {"embedding": 1, "position_embedding": 1, "linear": 0, "conv1d": 1, "experts_bias": 1}
KINDS = (*KIND_AXES, "experts_fused")

# Conventions for a norm's effective elementwise gain g: "weight" (OLMo 2, Gemma 4, Llama-style RMSNorm) or
# "one_plus_weight" (Gemma 1/2/3 store w and scale by 1 + w).
GAINS = ("weight", "one_plus_weight")


@dataclass(frozen=True)
class WriterRule:
    """A family of tensors that write into the residual stream.

    `pattern` is a regex matched in full against the tensor name relative to the layer prefix (for `scope="layer"`)
    or the text-model prefix (`scope="global"`, e.g. the embedding). `post_norms` are the weights (relative to the
    same prefix) of the norm(s) between this writer and the residual add, outermost last; their gains multiply.
    `when` names a boolean key of the text config the rule depends on ("!key" for its negation), for families whose
    wiring a config flag switches (Gemma 4's MoE block adds a second post-norm after its dense MLP).
    """

    pattern: str
    role: str
    kind: str
    scope: str = "layer"
    d_model_axis: int | None = None
    post_norms: tuple[str, ...] = ()
    gain: str = "weight"
    when: str = ""

    def __post_init__(self) -> None:
        # Table mistakes are programming errors, caught when the module is imported (and by the tests).
        if self.role not in ROLES or self.kind not in KINDS or self.gain not in GAINS:
            raise ValueError(f"bad WriterRule {self}")
        if self.kind == "experts_fused" and self.d_model_axis not in (1, 2, AXIS_FROM_SHAPE):
            raise ValueError(f"experts_fused rule {self.pattern} must name its d_model_axis (1, 2 or AXIS_FROM_SHAPE)")


@dataclass(frozen=True)
class Layout:
    """Where the text model sits in one on-disk (or in-memory) naming: its prefix and its output layer's name."""

    prefix: str
    lm_head: str = "lm_head.weight"


@dataclass(frozen=True)
class Architecture:
    """One table entry: everything abliterate needs to know about a model family's residual stream."""

    name: str
    layouts: tuple[Layout, ...]
    writers: tuple[WriterRule, ...]
    embed: str = "embed_tokens.weight"
    layers: str = "layers"
    final_norm: str = "norm"
    n_layers_key: str = "num_hidden_layers"
    d_model_key: str = "hidden_size"
    text_config_key: str = ""
    required_roles: tuple[str, ...] = ("mixer", "mlp")
    not_writers: tuple[str, ...] = ()
    refuse: str = ""
    # A wrapper whose language model may be of any family (LLaVA-style): its layouts and text_config_key are its own,
    # everything else comes from the entry of text_config's model_type.
    delegate: bool = False


@dataclass(frozen=True)
class TensorInfo:
    """An on-disk tensor's shape and dtype string (as safetensors names it, e.g. "BF16", or torch's)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TensorEdit:
    """How to edit one tensor: remove the direction along `axis` (of the tensor as stored).

    `needs` are other tensors the edit reads (post-norm weights, whose gains multiply with convention `gain`).
    """

    name: str
    kind: str
    role: str
    layer: int | None
    axis: int
    needs: tuple[str, ...] = ()
    gain: str = "weight"
    description: str = ""


@dataclass
class EditPlan:
    """Every tensor of a checkpoint to edit, and how; everything else is copied bit-identical."""

    arch: str
    model_type: str
    n_layers: int
    d_model: int
    prefix: str
    layers_prefix: str
    edits: dict[str, TensorEdit]
    untie: tuple[str, str] | None
    per_layer: dict[int, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def config_updates(self, config: dict) -> dict:
        """The config to write: embeddings are untied (the embedding is edited, the output layer is not)."""
        updated = dict(config)
        updated["tie_word_embeddings"] = False
        if isinstance(updated.get("text_config"), dict):
            updated["text_config"] = {**updated["text_config"], "tie_word_embeddings": False}
        return updated

    def describe(self) -> list[str]:
        """Human-readable lines for `abliterate inspect`: the entry, every edit, the ties and per-layer counts."""
        header = (f"architecture: {self.arch} (model_type {self.model_type}), {self.n_layers} layers, "
                  f"d_model {self.d_model}, text prefix '{self.prefix}'")
        lines = [header]
        if self.untie:
            lines.append(f"tied: {self.untie[1]} will be written from the ORIGINAL {self.untie[0]} "
                         "(tie_word_embeddings set to false)")
        else:
            lines.append("tied: no (the output layer is stored separately and copied unchanged)")
        for edit in self.edits.values():
            where = "global" if edit.layer is None else f"layer {edit.layer}"
            lines.append(f"  edit {edit.name}: {edit.description} [{where}, role {edit.role}]")
        counts = ", ".join(f"{layer}:{len(names)}" for layer, names in sorted(self.per_layer.items()))
        lines.append(f"edited tensors per layer: {counts}")
        lines.append(f"total edited tensors: {len(self.edits)}")
        lines.extend(self.notes)
        return lines


class EntryTable(dict[str, Architecture]):
    """Entries by config.model_type; `register` refuses a model_type twice."""

    def register(self, model_types: tuple[str, ...] | str, arch: Architecture) -> None:
        """Add an entry under one or more config.model_type values."""
        for model_type in (model_types,) if isinstance(model_types, str) else model_types:
            if model_type in self:
                raise ValueError(f"model_type {model_type} registered twice")
            self[model_type] = arch


# Llama's on-disk names, shared by most entries.
CAUSAL_LM = (Layout("model."),)
EMBED = WriterRule(r"embed_tokens\.weight", "embed", "embedding", scope="global")
ATTN_O = WriterRule(r"self_attn\.o_proj\.(weight|bias)", "mixer", "linear")
MLP_DOWN = WriterRule(r"mlp\.down_proj\.(weight|bias)", "mlp", "linear")
