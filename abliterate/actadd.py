"""ActAdd completions (the paper's steps 3 and 4): the base model's replies with the direction added or ablated by hooks.

Selection only scores the direction by logits; this generates with it. On harmless prompts the raw direction (the
chosen candidate, unnormalized) is added at its own layer's input: refusal should be induced (the paper: 0.00-0.05
-> 0.88-1.00). On harmful prompts the unit direction is ablated from every residual writer, the embedding included,
with the same hooks selection uses (so no layer input ever holds it): refusal should be bypassed. The ablated model
is the weight edit applied in memory, so its greedy replies must equal the edited checkpoint's word for word;
`compare_with_edited` lists any difference (a wrong edit, or a hook that is not the edit, shows up here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.errors import UserError
from abliterate.generation import Reply, generate_transformers
from abliterate.metrics import RefusalMatcher, refusal_rates

log = logging.getLogger(__name__)

MAX_DIFFERENCES_SHOWN = 5  # differing replies written into eval.json, enough to see what went wrong


@dataclass
class ActAddDirection:
    """The direction as ActAdd uses it: unit vector, the layer it was read at and the candidate's norm."""

    vector: Any  # [d_model] float32 tensor, unit norm
    layer: int
    norm: float
    source: str  # the direction file's name, for the report


def load_actadd_direction(measure_dir: Path) -> ActAddDirection:
    """The chosen direction of a measure folder; it must name its layer (ActAdd adds it at that layer)."""
    from abliterate.direction import DIRECTION_JSON, load_direction

    path = Path(measure_dir) / DIRECTION_JSON
    if not path.is_file():
        raise UserError(f"No {DIRECTION_JSON} in {measure_dir}; pass the folder `abliterate measure` wrote to "
                        "--measure, or drop --actadd.")
    direction = load_direction(path)
    if direction.layer is None:
        raise UserError(f"{path} names no layer, so the direction cannot be added at its layer; "
                        "drop --actadd or measure the direction with abliterate.")
    norm = direction.meta.get("candidate_norm") or direction.meta.get("source_norm") or 1.0
    return ActAddDirection(direction.vector, int(direction.layer), float(norm), path.name)


def actadd_replies(model: Any, tokenizer: Any, texts: dict[str, list[str]], direction: ActAddDirection,
                   stop_ids: Sequence[int], max_new_tokens: int, batch_size: int) -> dict[str, list[Reply]]:
    """Harmless replies with +r (raw norm) at the direction's layer, harmful replies with r ablated everywhere."""
    from abliterate.hooks import ablate_direction, add_direction, decoder_layers

    if not 0 <= direction.layer < len(decoder_layers(model)):
        raise UserError(f"The direction's layer {direction.layer} is not a layer of this model; pass the measure "
                        "folder of this model to --measure.")
    raw = direction.vector * direction.norm  # [d_model]
    with add_direction(model, raw, direction.layer):
        harmless = generate_transformers(model, tokenizer, texts["harmless"], stop_ids, max_new_tokens, batch_size)
    with ablate_direction(model, direction.vector):
        harmful = generate_transformers(model, tokenizer, texts["harmful"], stop_ids, max_new_tokens, batch_size)
    return {"harmless": harmless, "harmful": harmful}


def actadd_section(replies: dict[str, list[Reply]], categories: dict[str, list[str]], matcher: RefusalMatcher,
                   direction: ActAddDirection) -> dict[str, Any]:
    """Induced refusal (harmless, +r) and hooked bypass (harmful refusal with r ablated), as refusal rates."""
    return {
        "layer": direction.layer, "norm": direction.norm, "direction": direction.source,
        "induced_refusal": refusal_rates([r.text for r in replies["harmless"]], categories["harmless"], matcher),
        "hooked_refusal": refusal_rates([r.text for r in replies["harmful"]], categories["harmful"], matcher),
        "equal_to_edited": None,
    }


def compare_with_edited(prompts: Sequence[str], hooked: Sequence[Reply], edited: Sequence[Reply]) -> dict[str, Any]:
    """How many hooked-bypass replies equal the edited checkpoint's greedy replies token for token, and the first
    differences (prompt, both replies)."""
    differing = [index for index, (a, b) in enumerate(zip(hooked, edited)) if a.token_ids != b.token_ids]
    if differing:
        log.warning("%d of %d replies with r ablated by hooks differ from the edited checkpoint's greedy replies; "
                    "the edit is not the hooked intervention (see eval.json, actadd.equal_to_edited).",
                    len(differing), len(hooked))
    return {
        "n_equal": len(hooked) - len(differing), "n": len(hooked),
        "differences": [{"prompt": prompts[i], "hooked": hooked[i].text, "edited": edited[i].text}
                        for i in differing[:MAX_DIFFERENCES_SHOWN]],
    }
