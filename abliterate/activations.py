"""Residual-stream activations and the pure maths built on them: candidate directions and refusal scores.

The paper's candidates are differences of means: for every end-of-instruction position (the k tokens the chat
template puts after the instruction; left padding, so they are the last k tokens of every row) and every decoder
layer's input (resid_pre), the mean activation over harmful prompts minus the mean over harmless prompts. Means are
accumulated in float64 on the CPU, one forward pass per batch.

Layer inputs are recorded by hooks on `hooks.decoder_layers` (the architecture table decides which modules are the
decoder layers, so measuring, ablating and editing agree on what "layer i" means), keeping only the last k
positions. The same forward pass returns the last-position logits, so the base refusal score of every training prompt costs
nothing extra and prompt filtering (paper: keep harmful prompts the model refuses) is applied while accumulating.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self

import torch

from abliterate import progress
from abliterate.hooks import decoder_layers

log = logging.getLogger(__name__)

# Added inside both logarithms of the refusal score so that P_R = 0 or 1 gives a finite score (paper).
SCORE_EPS = 1e-8


# ---- pure maths ----

class RefusalTokens(tuple):
    """The refusal token ids at the scored position, and where some refusals open with a token that answers open
    with too ("Je" of "Je ne peux pas" and "Je vais vous expliquer", beside refusals opening "Désolé"): that `shared`
    token, teacher-forced one position further, and the refusal tokens after it (`after_shared`)."""

    shared: int
    after_shared: tuple[int, ...]

    def __new__(cls, ids: Sequence[int], shared: int = -1, after_shared: Sequence[int] = ()) -> Self:
        tokens = super().__new__(cls, ids)
        tokens.shared, tokens.after_shared = shared, tuple(after_shared)
        return tokens

    @property
    def positions(self) -> int:
        """How many last positions the score reads: the scored one, and the one after a shared opening."""
        return 2 if self.shared >= 0 else 1


def score_positions(refusal_ids: Sequence[int]) -> int:
    return getattr(refusal_ids, "positions", 1)


def refusal_score(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log(P_R + eps) - log(1 - P_R + eps) per row, P_R the next-token probability mass on the refusal tokens.

    `logits` is `[batch, vocab]` at the scored position, or `[batch, positions, vocab]` ending after it. With a
    shared opening (`RefusalTokens.shared`, teacher-forced last) P_R is the mass on the refusal tokens at the scored
    position (second to last) plus the shared token's probability there times the mass on the refusal tokens that
    follow it (last position): the probability that the reply opens as a refusal either way. Computed in float64 so
    that a P_R near 1 does not round to exactly 1.
    """
    shared, after = getattr(refusal_ids, "shared", -1), getattr(refusal_ids, "after_shared", ())
    if logits.dim() == 3 and shared < 0:
        logits = logits[:, -1]
    elif logits.dim() == 2 and shared >= 0:
        raise ValueError("a refusal score with a shared opening reads two positions: pass [batch, positions, vocab]")
    log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [batch, vocab] or [batch, positions, vocab]
    scored = log_probs if shared < 0 else log_probs[:, -2]  # [batch, vocab]
    p_refusal = scored[:, list(refusal_ids)].logsumexp(dim=-1).exp()  # [batch]
    if shared >= 0:
        p_refusal = p_refusal + scored[:, shared].exp() * log_probs[:, -1, list(after)].logsumexp(dim=-1).exp()
    return torch.log(p_refusal + SCORE_EPS) - torch.log(1 - p_refusal + SCORE_EPS)


def kl_divergence(base_log_probs: torch.Tensor, new_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(base || new) per row from two `[batch, vocab]` log-probability tensors, in float64."""
    base = base_log_probs.to(torch.float64)  # [batch, vocab]
    new = new_log_probs.to(torch.float64)  # [batch, vocab]
    return (base.exp() * (base - new)).sum(dim=-1)


def difference_of_means(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """The candidate directions: harmful mean minus harmless mean, both `[position, layer, d_model]`, in float64."""
    if harmful_mean.shape != harmless_mean.shape:
        raise ValueError(f"mean shapes differ: {tuple(harmful_mean.shape)} vs {tuple(harmless_mean.shape)}")
    return harmful_mean.to(torch.float64) - harmless_mean.to(torch.float64)


def cosine_with(vectors: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every vector along the last axis with `reference` `[d_model]` (0 for a zero vector)."""
    vectors = vectors.to(torch.float64)  # [..., d_model]
    unit = reference.to(torch.float64) / torch.linalg.vector_norm(reference.to(torch.float64))  # [d_model]
    norms = torch.linalg.vector_norm(vectors, dim=-1).clamp_min(1e-30)  # [...]
    return (vectors @ unit) / norms


# ---- batching ----

@dataclass
class Batch:
    """One left-padded batch of chat-formatted prompts, ready for the model."""

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    rows: list[int]  # index of each row in the texts given to `encode`
    # Per row, the length of its own teacher-forced continuation at the end (`encode`'s `continuations`): the
    # candidate positions come just before it. Empty: no row has one.
    tails: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode(tokenizer: Any, texts: Sequence[str], batch_size: int, suffix_ids: Sequence[int] = (),
           continuations: Sequence[Sequence[int]] | None = None) -> list[Batch]:
    """Tokenize chat-formatted texts into left-padded batches, each row followed by `suffix_ids`, then by its own
    continuation when `continuations` (one per text) are given.

    The texts were rendered by the chat template, which already holds any BOS token, so no special tokens are added.
    The suffix is the reply prefix every reply shares (a lone space, a fixed thinking block), teacher-forced as ids:
    appended as text it could merge with the prompt's last characters into other tokens. A continuation is a
    prompt's own reasoning up to its decision (`abliterate.decision`); `Batch.tails` records its length per row.
    Rows are sorted by length so that batches carry little padding; `Batch.rows` maps each row back to its text.
    """
    tokenizer.padding_side = "left"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tails = [len(continuations[i]) for i in rows] if continuations is not None else []
        if suffix_ids or continuations is not None:
            ids = [list(tokenizer(texts[i], add_special_tokens=False)["input_ids"]) + list(suffix_ids)
                   + (list(continuations[i]) if continuations is not None else []) for i in rows]
            encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        else:
            encoded = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt", add_special_tokens=False)
        batches.append(Batch(encoded["input_ids"], encoded["attention_mask"], rows, tails))
    return batches


def input_device(model: Any) -> torch.device:
    """Where input ids must go: the embedding's execution device (see `abliterate.model.input_device`)."""
    from abliterate.model import input_device as embedding_device

    return embedding_device(model)


def _accepts_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def forward_tail(model: Any, batch: Batch, n_positions: int) -> torch.Tensor:
    """One forward pass returning the logits of the last `n_positions` positions `[batch, n_positions, vocab]`.

    Only the last positions' logits are ever needed, so the output layer is run on those alone where the model
    supports `logits_to_keep` (a 128k-token vocabulary otherwise dominates the cost of short prompts).
    """
    device = input_device(model)
    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = n_positions
    output = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), **kwargs)
    return output.logits[:, -n_positions:, :]


def forward_last(model: Any, batch: Batch) -> torch.Tensor:
    """One forward pass returning the last position's logits `[batch, vocab]`."""
    return forward_tail(model, batch, 1)[:, -1, :]


# ---- accumulation ----

@dataclass
class SideActivations:
    """Per-side results of one pass over prompts: what the candidates and the reference report are built from."""

    mean: torch.Tensor  # [position, layer, d_model] float64 over the kept prompts
    scores: torch.Tensor  # [prompt] base refusal score of every prompt, in batch order (kept or not)
    n_kept: int
    reference_cosine: torch.Tensor | None = None  # [position, layer] mean cosine of single activations with the ref
    normalized_mean: torch.Tensor | None = None  # [position, layer, d_model] mean of unit-normalized activations


class _Sums:
    """Running float64 sums over kept prompts, `[position, layer, d_model]` (plain sums: batch order is free)."""

    def __init__(self, reference: torch.Tensor | None) -> None:
        self.reference = reference
        self.total: dict[int, torch.Tensor] = {}
        self.normalized: dict[int, torch.Tensor] = {}
        self.cosine: dict[int, torch.Tensor] = {}
        self.n = 0

    def add_batch(self, captured: dict[int, torch.Tensor], keep: torch.Tensor) -> None:
        """Add the kept rows (`keep` `[batch]` bool) of every layer's captured `[batch, position, d_model]`."""
        self.n += int(keep.sum())
        if bool(keep.any()):
            for layer, acts in captured.items():
                self.add(layer, acts[keep])

    def add(self, layer: int, acts: torch.Tensor) -> None:
        """Add one layer's kept activations `[kept, position, d_model]` (float64)."""
        self.total[layer] = self.total.get(layer, 0) + acts.sum(0)
        if self.reference is not None:
            norms = torch.linalg.vector_norm(acts, dim=-1, keepdim=True).clamp_min(1e-30)  # [kept, position, 1]
            self.normalized[layer] = self.normalized.get(layer, 0) + (acts / norms).sum(0)
            self.cosine[layer] = self.cosine.get(layer, 0) + cosine_with(acts, self.reference).sum(0)

    def _mean(self, sums: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.stack([sums[layer] for layer in sorted(sums)], dim=1) / self.n  # [position, layer, ...]

    def result(self, scores: torch.Tensor) -> SideActivations:
        if self.n == 0:
            return SideActivations(mean=torch.empty(0, dtype=torch.float64), scores=scores, n_kept=0)
        with_reference = self.reference is not None
        return SideActivations(
            mean=self._mean(self.total), scores=scores, n_kept=self.n,
            reference_cosine=self._mean(self.cosine) if with_reference else None,
            normalized_mean=self._mean(self.normalized) if with_reference else None,
        )


@contextmanager
def _last_positions(model: Any, n_positions: int,
                    tails: list[list[int]] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """While active, each forward pass records every decoder layer's input at the last `n_positions` positions.

    Only those positions are kept (as float64 on the CPU), so a long prompt on a big model never holds every
    layer's full residual stream at once. With `tails` (a one-item list the caller sets to each batch's
    `Batch.tails` before its pass) and rows that carry continuations, the first `n_positions - 1` positions end
    before each row's own continuation and the last is the row's last position: where its reasoning decides.
    """
    captured: dict[int, torch.Tensor] = {}

    def recorder(index: int) -> Any:
        def record(_module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, pos, d_model]
            row_tails = tails[0] if tails else []
            if row_tails:
                length, device = hidden.shape[1], hidden.device
                ends = length - torch.tensor(row_tails, device=device)  # [batch]
                before = ends[:, None] - (n_positions - 1) + torch.arange(n_positions - 1, device=device)
                positions = torch.cat([before, torch.full_like(ends[:, None], length - 1)], dim=1)  # [batch, n]
                picked = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[2]))
            else:
                picked = hidden[:, -n_positions:, :]  # [batch, n_positions, d_model]
            captured[index] = picked.detach().to("cpu", torch.float64)
        return record

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def mean_activations(model: Any, batches: list[Batch], n_positions: int, refusal_ids: Sequence[int],
                     keep_sign: int = 0, reference: torch.Tensor | None = None,
                     description: str = "activations") -> SideActivations:
    """Mean resid_pre at the last `n_positions` positions of every decoder layer, over the kept prompts.

    `keep_sign` filters prompts by their base refusal score as they stream past: +1 keeps prompts with score > 0
    (harmful prompts the model refuses), -1 keeps score < 0, 0 keeps all. With a `reference` direction the pass also
    accumulates, per position and layer, the cosine of each kept prompt's activation with it and the mean of the
    unit-normalized activations.
    """
    sums, scores, tails = _Sums(reference), [], [[]]
    with _last_positions(model, n_positions, tails) as captured:
        for batch in progress.track(batches, description):
            tails[0] = batch.tails
            batch_scores = refusal_score(forward_tail(model, batch, score_positions(refusal_ids)),
                                         refusal_ids).cpu()  # [batch]
            scores.append(batch_scores)
            keep = batch_scores * keep_sign > 0 if keep_sign else torch.ones_like(batch_scores, dtype=torch.bool)
            sums.add_batch(captured, keep)
    return sums.result(in_text_order(batches, scores))


def in_text_order(batches: list[Batch], per_batch: list[torch.Tensor]) -> torch.Tensor:
    """Per-row results gathered batch by batch, put back in the order of the texts given to `encode`."""
    if not per_batch:
        return torch.zeros(0, dtype=torch.float64)
    rows = torch.tensor([row for batch in batches for row in batch.rows])  # [n]
    stacked = torch.cat(per_batch)  # [n, ...]
    ordered = torch.empty_like(stacked)
    ordered[rows] = stacked
    return ordered
