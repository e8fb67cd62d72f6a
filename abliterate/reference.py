"""How a reference direction (`measure.direction_file`, e.g. the paper code's `direction.pt`) compares with the
measured candidates: scored like a candidate when `measure.use_reference` ships it, and its cosine with every
candidate and with the harmful activations, per position and layer (reference_cosines.csv).

`fit` is measure's fit of one model (its candidates, means and refusal tokens).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from abliterate.activations import cosine_with
from abliterate.direction import Direction
from abliterate.selection import ValidationSet, bypass_and_kl, induce_score

log = logging.getLogger(__name__)


def reference_choice(model: Any, fit: Any, val: ValidationSet, reference: Direction) -> dict[str, Any]:
    """The reference direction, scored like a candidate, at its own layer and position when the file names them.

    A file without them (the paper code's `direction.pt`) is placed at the candidate it is most aligned with, and
    that candidate's norm scales it for the induce score, so every later step has a layer to work with.
    """
    layer, position, norm = reference.layer, reference.position, reference.meta.get("candidate_norm")
    k = fit.n_positions
    if layer is None or not 0 <= layer < fit.n_layers or position is None or not -k <= position < 0:
        cosines = cosine_with(fit.candidates, reference.vector)  # [position, layer]
        index, layer = divmod(int(cosines.argmax()), fit.n_layers)
        position = index - k
        norm = float(torch.linalg.vector_norm(fit.candidates[index, layer]))
        log.info("The reference names no usable layer/position; using the most aligned candidate's: layer %d, "
                 "position %d (cosine %.3f).", layer, position, float(cosines[index, layer]))
    bypass, kl = bypass_and_kl(model, reference.vector, val, fit.refusal_ids)
    scale = float(norm) if norm is not None else 1.0  # induce adds the raw (unnormalized) vector
    induce = induce_score(model, reference.vector * scale, layer, val, fit.refusal_ids)
    return {"vector": reference.vector, "layer": layer, "position": position, "bypass": bypass, "kl": kl,
            "induce": induce, "norm": norm}


def reference_tables(fit: Any, reference: Direction) -> dict[str, torch.Tensor]:
    """Per position and layer: candidate cosine, mean single-activation cosine, normalized-mean cosine."""
    tables = {"candidate_cosine": cosine_with(fit.candidates, reference.vector)}  # [position, layer]
    if fit.harmful.reference_cosine is not None and fit.harmful.normalized_mean is not None:
        tables["harmful_mean_single_cosine"] = fit.harmful.reference_cosine  # [position, layer]
        tables["harmful_normalized_mean_cosine"] = cosine_with(fit.harmful.normalized_mean, reference.vector)
    return tables


def reference_summary(tables: dict[str, torch.Tensor], fit: Any, chosen: dict[str, Any]) -> dict[str, Any]:
    k = fit.n_positions
    cosines = tables["candidate_cosine"]  # [position, layer]
    flat = int(cosines.abs().argmax())
    best_position, best_layer = divmod(flat, fit.n_layers)
    summary: dict[str, Any] = {"best_candidate": {"position": best_position - k, "layer": best_layer,
                                                  "cosine": float(cosines[best_position, best_layer])}}
    if chosen.get("layer") is not None and chosen.get("position") is not None and -k <= chosen["position"] < 0:
        summary["chosen_cosine"] = float(cosines[chosen["position"] + k, chosen["layer"]])
    return summary


def write_reference_csv(path: Path, tables: dict[str, torch.Tensor], k: int) -> None:
    names = list(tables)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["position", "layer", *names])
        n_positions, n_layers = tables[names[0]].shape
        for p in range(n_positions):
            for layer in range(n_layers):
                writer.writerow([p - k, layer, *(f"{float(tables[n][p, layer]):.6f}" for n in names)])
