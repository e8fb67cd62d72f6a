"""Architectures as data: which on-disk tensors of each model family write into the residual stream, and how.

One `Architecture` entry per `config.model_type` names where the text model lives in the checkpoint (its tensor-name
prefixes, so multimodal wrappers edit only their language model), the layer container, the residual writers as
`WriterRule`s (a regex relative to the layer prefix, a role, a kind, and for sandwich norms the post-norm tensors and
their gain convention), and what is tied. `plan_edits` turns an entry plus a checkpoint's config and tensor list into
an `EditPlan`: every tensor to edit and how. It never guesses: an unknown family, a layer with no writer found, a
tensor that looks like an output projection but that no rule claims, or a residual stream that is not one stream are
all `UserError`s. The maths of each kind lives in `abliterate.weights`; in-memory hooks in `abliterate.hooks`.

The package: `schema` (the entry and plan types), `plan` (entry + checkpoint -> plan), and the entries in `dense` and
`moe` (MoE, hybrid, multimodal), merged into `ARCHITECTURES` here. Adding a family means adding an entry there (and a
tiny model in tests/tiny_models.py), nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from abliterate.architectures import dense, moe
from abliterate.architectures.plan import plan_for
from abliterate.architectures.schema import (
    AXIS_FROM_SHAPE,
    GAINS,
    KIND_AXES,
    KINDS,
    ROLES,
    Architecture,
    EditPlan,
    EntryTable,
    Layout,
    TensorEdit,
    TensorInfo,
    WriterRule,
)
from abliterate.errors import UserError

__all__ = ["ARCHITECTURES", "AXIS_FROM_SHAPE", "GAINS", "KINDS", "KIND_AXES", "ROLES", "Architecture", "EditPlan",
           "Layout", "TensorEdit", "TensorInfo", "WriterRule", "architecture_for", "plan_edits"]

# ---- the table: every entry module's entries, each model_type once ----------------------------------------------

ARCHITECTURES = EntryTable()
for _entries in (dense.ENTRIES, moe.ENTRIES):
    for _model_type, _arch in _entries.items():
        ARCHITECTURES.register(_model_type, _arch)


# ---- looking a model up in the table --------------------------------------------------------------------------------

def architecture_for(config: dict) -> Architecture:
    """The table entry for a config.json dict, or a UserError listing what is supported."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        supported = sorted(name for name, entry in ARCHITECTURES.items() if not entry.refuse)
        raise UserError(f"Unsupported model_type {model_type!r} in config.json (abliterate knows only the families "
                        f"in abliterate/architectures/). Supported: {', '.join(supported)}.")
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


def plan_edits(config: dict, tensors: Mapping[str, TensorInfo]) -> EditPlan:
    """The edit plan of a checkpoint from its config.json dict and its tensors' names, shapes and dtypes."""
    return plan_for(architecture_for(config), config, tensors)
