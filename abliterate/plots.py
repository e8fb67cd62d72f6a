"""Figures written by `measure`: the three selection scores against layer (like the paper's figure) and the cosine
heatmap of every candidate with a reference direction; and by `optimize`: the trials' Pareto plot.

matplotlib runs on the Agg backend (no display needed); every figure is written to a temporary name and renamed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from abliterate.selection import CandidateScore

# (score, panel title, y-axis label)
_PANELS = (("bypass", "Refusal score, direction ablated (harmful)", "mean refusal score (log-odds)"),
           ("induce", "Refusal score, direction added (harmless)", "mean refusal score (log-odds)"),
           ("kl", "KL(base || ablated), harmless", "mean KL divergence at the last position (nats)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_scores(scores: Sequence[CandidateScore], path: Path, title: str = "", cutoff_layer: int | None = None,
                token_texts: dict[int, str] | None = None, kl_max: float | None = None,
                baseline: dict[str, float] | None = None) -> Path:
    """Bypass, induce and KL against layer, one line per position; the chosen candidate is starred.

    The dotted vertical line marks the first discarded layer; dashed grey lines mark the filters' thresholds
    (refusal score 0, the KL limit); solid red lines the base model's own score without any edit (`baseline`,
    per panel: KL's baseline is 0 by definition). `title` should name the model publicly, never by a local path.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    n_layers = max(s.layer for s in scores) + 1
    positions = sorted({s.position for s in scores})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    baselines = {"kl": 0.0, **(baseline or {})}
    for axis, (key, label, y_label) in zip(axes, _PANELS):
        for position in positions:
            rows = sorted((s for s in scores if s.position == position), key=lambda s: s.layer)
            name = f"pos {position}" + (f" {token_texts[position]!r}" if token_texts and position in token_texts else "")
            # NaN (not scored: a discarded layer, or a pruned KL or induce pass) leaves a gap in the line.
            axis.plot([s.layer for s in rows], [getattr(s, key) for s in rows], marker="o", markersize=3, label=name)
        for s in scores:
            if s.chosen:
                axis.plot([s.layer], [getattr(s, key)], marker="*", markersize=14, color="black", linestyle="none")
        if cutoff_layer is not None:
            axis.axvline(cutoff_layer - 0.5, color="grey", linestyle=":", linewidth=1)
        threshold = kl_max if key == "kl" else 0.0
        if threshold is not None:
            axis.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
        if key in baselines:
            axis.axhline(baselines[key], color="tab:red", linewidth=1, label="no edit (base model)")
        axis.set_xlim(-0.5, n_layers - 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("layer")
        axis.set_ylabel(y_label)
        axis.set_title(label, fontsize=10)
        if key != "bypass" and any(math.isnan(getattr(s, key)) and not math.isnan(s.bypass) for s in scores):
            axis.text(0.02, 0.97, "scored only where it could change the choice;\n--score-all scores every candidate",
                      transform=axis.transAxes, fontsize=7, color="grey", verticalalignment="top")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_cosine_heatmap(cosines: torch.Tensor, path: Path, title: str = "",
                        token_texts: dict[int, str] | None = None) -> Path:
    """Cosine of every candidate with the reference, `cosines` `[position, layer]`, positions counted from the end.

    Each row is labelled with its position and, when `token_texts` ({position: text}) has it, that token's text.
    """
    plt = _pyplot()
    n_positions, n_layers = cosines.shape
    fig, axis = plt.subplots(figsize=(max(6.0, 0.3 * n_layers + 2), 0.5 * n_positions + 1.5))
    image = axis.imshow(cosines.float().numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    texts = token_texts or {}
    labels = [f"{p - n_positions}" + (f" {texts[p - n_positions]!r}" if p - n_positions in texts else "")
              for p in range(n_positions)]
    axis.set_yticks(range(n_positions), labels)
    axis.set_xlabel("layer")
    axis.set_ylabel("position from the end (token)")
    axis.set_title(title or "Cosine similarity of each candidate with the reference direction", fontsize=10)
    fig.colorbar(image, ax=axis).set_label("cosine similarity with the reference")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_pareto(trials: Sequence[dict], chosen: int, paper: int, path: Path, title: str = "") -> Path:
    """Every trial's validation refusal against KL, the Pareto front joined, the chosen and the paper's edit marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [t for t in trials if all(v is not None and math.isfinite(v) for v in (t["refusal"], t["kl"]))]
    unscored = sum(t["kl"] is None for t in trials)  # edits that kept refusing on validation: no KL computed
    ax.scatter([t["kl"] for t in finite], [t["refusal"] for t in finite], s=12, color="0.6",
               label="trial" + (f" ({unscored} more kept refusing: no KL computed)" if unscored else ""))
    front = sorted((t for t in finite if t["pareto"]), key=lambda t: t["kl"])
    ax.plot([t["kl"] for t in front], [t["refusal"] for t in front], "o-", color="tab:blue", ms=4, label="Pareto front")
    for number, marker, colour, label in ((paper, "s", "tab:orange", "paper's edit"), (chosen, "*", "tab:red", "chosen")):
        point = next((t for t in finite if t["trial"] == number), None)
        if point is not None:
            ax.scatter([point["kl"]], [point["refusal"]], marker=marker, s=120, color=colour, zorder=3,
                       label=f"{label} (trial {number})")
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel("per-token KL(base || edited) over base replies, harmless validation prompts")
    ax.set_ylabel("refusal probability, harmful validation prompts")
    ax.set_title(title)
    ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
