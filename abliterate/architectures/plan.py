"""From an architecture entry, a checkpoint's config and its tensor list to an `EditPlan`, refusing what it cannot edit.

It never guesses: a layer with no writer found, a tensor that looks like an output projection but that no rule
claims, or a quantized layout are all `UserError`s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from abliterate.architectures.schema import (
    AXIS_FROM_SHAPE,
    KIND_AXES,
    Architecture,
    EditPlan,
    Layout,
    TensorEdit,
    TensorInfo,
    WriterRule,
)
from abliterate.errors import UserError

# Safety net: inside a text layer, a tensor whose name looks like an output projection must be claimed by a rule.
_LOOKS_LIKE_WRITER = re.compile(
    r"(^|\.)(o_proj|out_proj|down_proj|c_proj|dense_4h_to_h|fc2|w2|wo|dense|output_proj)(\.weight|\.bias|_bias)?$"
)
# Quantized layouts store weights as packed blocks plus scales (gpt-oss MXFP4 `down_proj_blocks`/`_scales`, GPTQ/AWQ
# `qweight`, FP8 `weight_scale_inv`): there is no float tensor to edit, so such a checkpoint is refused by name.
_QUANTIZED = re.compile(r"(_blocks|_scales|\.qweight|\.qzeros|\.weight_scale_inv)$")

# Outside the layers: a [n, d_model] table named like an embedding (token, position, token-type) must be claimed too.
_LOOKS_LIKE_EMBEDDING = re.compile(r"(embed|wte|wpe|position)")


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


def plan_for(arch: Architecture, config: dict, tensors: Mapping[str, TensorInfo]) -> EditPlan:
    """The edit plan of a checkpoint of family `arch` from its config.json dict and its tensors' names and shapes."""
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
