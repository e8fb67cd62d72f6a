"""Architectures as data: which on-disk tensors of each model family write into the residual stream, and how.

One `Architecture` entry per `config.model_type` names where the text model lives in the checkpoint (its tensor-name
prefixes, so multimodal wrappers edit only their language model), the layer container, the residual writers as
`WriterRule`s (a regex relative to the layer prefix, a role, a kind, and for sandwich norms the post-norm tensors and
their gain convention), and what is tied. `plan_edits` turns an entry plus a checkpoint's config and tensor list into
an `EditPlan`: every tensor to edit and how. It never guesses: an unknown family, a layer with no writer found, a
tensor that looks like an output projection but that no rule claims, or a residual stream that is not one stream are
all `UserError`s. The maths of each kind lives in `abliterate.weights`; in-memory hooks in `abliterate.hooks`.

The entries themselves live in `abliterate.architectures_dense` and `abliterate.architectures_moe` (registered on
import). Adding a family means adding an entry there (and a tiny model in tests/tiny_models.py), nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from abliterate.errors import UserError

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

# Safety net: inside a text layer, a tensor whose name looks like an output projection must be claimed by a rule.
_LOOKS_LIKE_WRITER = re.compile(
    r"(^|\.)(o_proj|out_proj|down_proj|c_proj|dense_4h_to_h|fc2|w2|wo|dense|output_proj)(\.weight|\.bias|_bias)?$"
)
# Quantized layouts store weights as packed blocks plus scales (gpt-oss MXFP4 `down_proj_blocks`/`_scales`, GPTQ/AWQ
# `qweight`, FP8 `weight_scale_inv`): there is no float tensor to edit, so such a checkpoint is refused by name.
_QUANTIZED = re.compile(r"(_blocks|_scales|\.qweight|\.qzeros|\.weight_scale_inv)$")

# Outside the layers: a [n, d_model] table named like an embedding (token, position, token-type) must be claimed too.
_LOOKS_LIKE_EMBEDDING = re.compile(r"(embed|wte|wpe|position)")


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


def _text_config(config: dict, arch: Architecture) -> dict:
    if arch.text_config_key and isinstance(config.get(arch.text_config_key), dict):
        return config[arch.text_config_key]
    return config


def _choose_layout(arch: Architecture, names: Mapping[str, TensorInfo]) -> Layout:
    """The first layout whose embedding is present, preferring one whose output layer is present too.

    Several families store the same text prefix with two output-layer names (GPT-NeoX: `embed_out` on the Hub,
    `lm_head` in memory), and a tied checkpoint stores no output layer at all.
    """
    present = [layout for layout in arch.layouts if layout.prefix + arch.embed in names]
    with_head = [layout for layout in present if layout.lm_head in names]
    if with_head or present:
        return (with_head or present)[0]
    expected = " or ".join(layout.prefix + arch.embed for layout in arch.layouts)
    raise UserError(f"No token embedding found for a {arch.name} checkpoint (expected {expected}); "
                    "the checkpoint is incomplete or not of the model_type its config.json claims.")


def _describe(rule: WriterRule, kind: str, axis: int) -> str:
    text = {"embedding": "token embedding rows", "position_embedding": "position embedding rows",
            "linear": "linear output (W <- W - r r^T W)", "conv1d": "transposed Conv1D (W <- W - (W r) r^T)",
            "experts_fused": f"fused experts, d_model on axis {axis}", "experts_bias": "fused expert biases",
            "bias": "bias (b <- b - (b.r) r)"}[kind]
    if rule.post_norms:
        gain = "1 + w" if rule.gain == "one_plus_weight" else "w"
        text += f", behind post-norm {' * '.join(rule.post_norms)} (gain {gain}: r -> normalize(g * r))"
    return text


def _fused_axis_from_shape(name: str, info: TensorInfo, d_model: int) -> int:
    """The d_model axis (1 or 2) of a fused expert tensor stored in either orientation; ambiguous shapes refused."""
    axes = [axis for axis in (1, 2) if len(info.shape) == 3 and info.shape[axis] == d_model]
    if len(axes) != 1:
        raise UserError(f"Fused experts {name} have shape {list(info.shape)}: cannot tell which axis is d_model="
                        f"{d_model} (this family stores both orientations); refusing to guess.")
    return axes[0]


def _make_edit(name: str, rel: str, rule: WriterRule, layer: int | None, base: str,
               info: TensorInfo, d_model: int) -> TensorEdit:
    is_bias = rel.endswith("bias") and len(info.shape) == 1
    axis = rule.d_model_axis if rule.kind == "experts_fused" else (0 if is_bias else KIND_AXES[rule.kind])
    if axis == AXIS_FROM_SHAPE:
        axis = _fused_axis_from_shape(name, info, d_model)
    if axis >= len(info.shape) or info.shape[axis] != d_model:
        raise UserError(f"Tensor {name} has shape {list(info.shape)} but a {rule.kind} residual writer needs "
                        f"d_model={d_model} on axis {axis}; the checkpoint does not match its config.json.")
    kind = "bias" if is_bias and rule.kind in ("linear", "conv1d") else rule.kind
    return TensorEdit(name=name, kind=rule.kind, role=rule.role, layer=layer, axis=axis,
                      needs=tuple(base + norm for norm in rule.post_norms), gain=rule.gain,
                      description=_describe(rule, kind, axis))


def _match(rules: list[WriterRule], rel: str) -> WriterRule | None:
    found = [rule for rule in rules if re.fullmatch(rule.pattern, rel)]
    if len(found) > 1:
        raise ValueError(f"table error: {rel} matches several rules: {[r.pattern for r in found]}")
    return found[0] if found else None


def plan_edits(config: dict, tensors: Mapping[str, TensorInfo]) -> EditPlan:
    """The edit plan of a checkpoint from its config.json dict and its tensors' names, shapes and dtypes."""
    arch = architecture_for(config)
    text = _text_config(config, arch)
    n_layers, d_model = _required_int(text, arch.n_layers_key, arch), _required_int(text, arch.d_model_key, arch)
    layout = _choose_layout(arch, tensors)
    layers_prefix = f"{layout.prefix}{arch.layers}."
    layer_name = re.compile(re.escape(layers_prefix) + r"(\d+)\.(.+)")
    rules = [rule for rule in arch.writers if _applies(rule, text)]
    global_rules = [rule for rule in rules if rule.scope == "global"]
    layer_rules = [rule for rule in rules if rule.scope == "layer"]
    edits: dict[str, TensorEdit] = {}
    per_layer: dict[int, list[str]] = {i: [] for i in range(n_layers)}
    beyond: set[int] = set()
    for name, info in tensors.items():
        found = layer_name.fullmatch(name)
        if found:
            layer, rel = int(found.group(1)), found.group(2)
            if layer >= n_layers:
                beyond.add(layer)  # e.g. DeepSeek's multi-token-prediction layer: transformers does not load it
                continue
            rule = _match(layer_rules, rel)
            if rule is None:
                _check_unclaimed(name, rel, arch)
                continue
            edits[name] = _make_edit(name, rel, rule, layer, f"{layers_prefix}{layer}.", info, d_model)
            per_layer[layer].append(name)
        elif name.startswith(layout.prefix):
            rule = _match(global_rules, name[len(layout.prefix):])
            if rule is None:
                _check_unclaimed_embedding(name, name[len(layout.prefix):], info, d_model, arch)
            else:
                edits[name] = _make_edit(name, name[len(layout.prefix):], rule, None, layout.prefix, info, d_model)
    _check_layers(arch, edits, per_layer)
    _check_needs(edits, tensors)
    untie = _untie(config, arch, layout, tensors)
    notes = [f"note: layer {i} is beyond {arch.n_layers_key}={n_layers}: not loaded by transformers, copied unchanged"
             for i in sorted(beyond)]
    return EditPlan(arch=arch.name, model_type=config.get("model_type", ""), n_layers=n_layers, d_model=d_model,
                    prefix=layout.prefix, layers_prefix=layers_prefix, edits=edits, untie=untie,
                    per_layer=per_layer, notes=notes)


def _applies(rule: WriterRule, text: dict) -> bool:
    """Whether a rule's config condition (`when`) holds for this checkpoint's text config."""
    if not rule.when:
        return True
    key = rule.when.lstrip("!")
    return bool(text.get(key)) != rule.when.startswith("!")


def _required_int(text: dict, key: str, arch: Architecture) -> int:
    value = text.get(key)
    if not isinstance(value, int) or value < 1:
        raise UserError(f"config.json of this {arch.name} model has no valid '{key}' (got {value!r}); fix config.json.")
    return value


def _check_unclaimed(name: str, rel: str, arch: Architecture) -> None:
    if _QUANTIZED.search(rel):
        raise UserError(f"Tensor {name} is quantized; abliterate edits float16, bfloat16 and float32 weights. "
                        "Use a dequantized (e.g. BF16) copy of the checkpoint as MODEL.")
    if _LOOKS_LIKE_WRITER.search(rel) and not any(re.fullmatch(p, rel) for p in arch.not_writers):
        raise UserError(f"Tensor {name} looks like an output projection into the residual stream, but the "
                        f"'{arch.name}' architecture entry has no rule for it; refusing to edit approximately. "
                        "Report this checkpoint layout so abliterate/architectures.py can be extended.")


def _check_unclaimed_embedding(name: str, rel: str, info: TensorInfo, d_model: int, arch: Architecture) -> None:
    """Outside the layers, a [n, d_model] table named like an embedding adds to the residual: it must be claimed."""
    if (len(info.shape) == 2 and info.shape[1] == d_model and _LOOKS_LIKE_EMBEDDING.search(rel)
            and not any(re.fullmatch(p, rel) for p in arch.not_writers)):
        raise UserError(f"Tensor {name} looks like an embedding table that adds to the residual stream, but the "
                        f"'{arch.name}' architecture entry has no rule for it; refusing to edit approximately. "
                        "Report this checkpoint layout so abliterate/architectures.py can be extended.")


def _check_layers(arch: Architecture, edits: dict[str, TensorEdit], per_layer: dict[int, list[str]]) -> None:
    for layer, names in per_layer.items():
        roles = {edits[name].role for name in names}
        missing = [role for role in arch.required_roles if role not in roles]
        if missing:
            raise UserError(f"Layer {layer} of this {arch.name} checkpoint has no {' or '.join(missing)} residual "
                            "writer; refusing to edit only part of the model (the checkpoint is incomplete or its "
                            "layout is not the one abliterate knows).")
    if not any(edit.role == "embed" for edit in edits.values()):
        raise UserError(f"No embedding edit planned for this {arch.name} checkpoint; refusing a partial edit.")


def _check_needs(edits: dict[str, TensorEdit], tensors: Mapping[str, TensorInfo]) -> None:
    for edit in edits.values():
        for need in edit.needs:
            if need not in tensors:
                raise UserError(f"Editing {edit.name} needs the post-norm weight {need}, which the checkpoint "
                                "lacks; the checkpoint is incomplete.")
            # The exact post-norm edit holds for a bias-free RMSNorm (output = g * y / rms(y)); a LayerNorm's bias
            # and mean subtraction would leave a component along r, so such a layout is refused, not approximated.
            bias = need.removesuffix("weight") + "bias"
            if bias != need and bias in tensors:
                raise UserError(f"The post-norm of {edit.name} has a bias ({bias}); the exact edit behind a norm "
                                "needs a bias-free RMSNorm, so abliterate refuses this checkpoint layout.")


def _untie(config: dict, arch: Architecture, layout: Layout, tensors: Mapping[str, TensorInfo]) -> tuple[str, str] | None:
    """Tied checkpoints store no output layer; we write one from the original embedding (the embedding is edited)."""
    if layout.lm_head in tensors:
        return None
    # An absent key means the family's default; with no output layer stored, only a tie makes a working model.
    text = _text_config(config, arch)
    if config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)) is False:
        raise UserError(f"The checkpoint has no output layer {layout.lm_head} and config.json does not tie it to "
                        "the embedding; the checkpoint is incomplete.")
    return (layout.prefix + arch.embed, layout.lm_head)


# ---- the table ----------------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Architecture] = {}


def register(model_types: tuple[str, ...] | str, arch: Architecture) -> None:
    """Add a table entry under one or more config.model_type values."""
    for model_type in (model_types,) if isinstance(model_types, str) else model_types:
        if model_type in ARCHITECTURES:
            raise ValueError(f"model_type {model_type} registered twice")
        ARCHITECTURES[model_type] = arch


def architecture_for(config: dict) -> Architecture:
    """The table entry for a config.json dict, or a UserError listing what is supported."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        supported = sorted(name for name, entry in ARCHITECTURES.items() if not entry.refuse)
        raise UserError(f"Unsupported model_type {model_type!r} in config.json (abliterate knows only the families "
                        f"in abliterate/architectures.py). Supported: {', '.join(supported)}.")
    if arch.refuse:
        raise UserError(f"model_type {model_type!r} is not supported: {arch.refuse}")
    if arch.delegate:
        text = config.get(arch.text_config_key)
        inner = architecture_for(text if isinstance(text, dict) else {})
        if inner.delegate or inner.text_config_key:
            raise UserError(f"model_type {model_type!r} wraps another wrapper ({inner.name}); not supported.")
        return replace(inner, name=f"{arch.name}[{inner.name}]", layouts=arch.layouts,
                       text_config_key=arch.text_config_key)
    return arch


CAUSAL_LM = (Layout("model."),)
EMBED = WriterRule(r"embed_tokens\.weight", "embed", "embedding", scope="global")
ATTN_O = WriterRule(r"self_attn\.o_proj\.(weight|bias)", "mixer", "linear")
MLP_DOWN = WriterRule(r"mlp\.down_proj\.(weight|bias)", "mlp", "linear")


# Gemma 3n keeps several residual streams (AltUp) and mixes them per layer: removing r from one stream's writers is not
# the paper's edit, and an approximate edit would be silently wrong, so it is refused.
_ALTUP = ("its residual stream is not a single stream (Gemma 3n AltUp keeps several and mixes them), so a "
          "single-direction weight edit would be approximate; abliterate refuses it rather than edit it wrongly.")
for _model_type in ("gemma3n", "gemma3n_text"):
    register(_model_type, Architecture(_model_type, CAUSAL_LM, (), refuse=_ALTUP))

# The dense entries and the MoE, hybrid and multimodal entries live in their own modules,
# registered on import; the building blocks above are shared by both.
from abliterate import architectures_dense, architectures_moe  # noqa: F401
