"""A parameterized edit: per-layer directions and ablation weights, realised both as weights and as hooks.

The paper's edit removes one direction at full strength from every residual writer. This edit generalises it with
a small parameter set (what `abliterate optimize` searches):

- the direction: one candidate direction at a fractional layer index f (r = lerp(r_floor(f), r_ceil(f), frac(f)),
  both unit vectors) or `per_layer`, where the writers of layer l use the candidate at layer l+1's input (the first
  place what they write is read; the last layer uses its own) and the embedding uses layer 0's writers' direction;
  candidates all come from one end-of-instruction `position`;
- `projected`: each direction loses its component along the harmless mean at its layer, so the edit removes only
  what separates harmful from harmless prompts and not the part that every prompt has;
- per writer kind (attention/mixer, MLP, embedding) an ablation weight w: a layer kernel for the mixer and the MLP
  (weight `peak_weight` at `peak_layer`, falling linearly to `min_weight` at distance `width`, zero beyond) and one
  weight for the embedding; Gemma 4's per-layer-input projection ("extra") follows the MLP kernel;
- `preserve_norm`: after the projection, every vector the tensor writes along d_model (a column of an nn.Linear
  weight, i.e. what one input unit adds to the residual; an embedding row; a Conv1D row; one expert's column) is
  rescaled to its original length. That axis is the one whose vectors are added to the residual, so rescaling keeps
  each of them orthogonal to u (the full-strength edit still removes r exactly) and keeps every unit's write
  magnitude, which is what norm-preserving abliteration wants to keep. Biases are projected only.

Each tensor gets T <- T - w (T.u) (x) u along its d_model axis, with u = r_l or, behind a post-norm, normalize(g*r_l)
as in `abliterate.weights`: a rank-one change per matrix (per expert), followed with `preserve_norm` by the diagonal
rescale of its write vectors. `hooked_edit` realises exactly the same linear maps on a loaded model (forward hooks on
each writer's output; with `preserve_norm` the matrix writers' parameters are swapped for their rescaled originals
while the hooks are active), so the model the search scores is the checkpoint `apply` writes from the recorded
parameters (`write_edit`/`read_edit`), to float tolerance, in every family of the architecture table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from abliterate.architectures import EditPlan, TensorEdit
from abliterate.errors import UserError
from abliterate.weights import COMPUTE_DTYPE, norm_gain, post_norm_direction

EDIT_FILE = "edit.json"
EDIT_VECTORS = "edit_directions.safetensors"
EDIT_FORMAT = "abliterate-parameterized-edit-1"
# Largest slice edited at once when writing (as `apply.edit_in_chunks`): the edit acts on each d_model vector
# independently, so slicing along any other axis gives the same values with small float64 temporaries.
EDIT_CHUNK_ELEMENTS = 2**22


@dataclass
class Kernel:
    """Ablation weight per layer: `peak_weight` at `peak_layer`, linear to `min_weight` at distance `width`, 0 beyond."""

    peak_weight: float = 1.0
    peak_layer: float = 0.0
    min_weight: float = 1.0
    width: float = 1e9

    def weight(self, layer: int) -> float:
        distance = abs(layer - self.peak_layer)
        if distance > self.width:
            return 0.0
        return self.peak_weight + (distance / self.width) * (self.min_weight - self.peak_weight)


@dataclass
class EditParams:
    """Everything that defines a parameterized edit; `paper` is the paper's single-direction edit."""

    position: int  # counted from the end of the prompt: -1 is the last token
    direction_index: float  # fractional layer index of the single direction (ignored when per_layer)
    per_layer: bool = False
    projected: bool = False
    preserve_norm: bool = False
    mixer: Kernel = field(default_factory=Kernel)
    mlp: Kernel = field(default_factory=Kernel)
    embed_weight: float = 1.0

    @classmethod
    def paper(cls, layer: int, position: int) -> EditParams:
        """The paper's edit: the candidate at (layer, position), removed at full strength from every writer."""
        return cls(position=position, direction_index=float(layer))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditParams:
        values = dict(values)
        mixer, mlp = Kernel(**values.pop("mixer", {})), Kernel(**values.pop("mlp", {}))
        return cls(**values, mixer=mixer, mlp=mlp)

    def weight(self, role: str, layer: int | None) -> float:
        """The ablation weight of a writer of `role` in `layer` (None for the embedding)."""
        if role == "embed" or layer is None:
            return self.embed_weight
        return (self.mixer if role == "mixer" else self.mlp).weight(layer)


# ---- directions ----

def _unit(vector: Tensor) -> Tensor:
    vector = vector.to(COMPUTE_DTYPE)  # [d_model]
    norm = vector.norm()
    return vector / norm if bool(torch.isfinite(norm)) and norm > 0 else torch.zeros_like(vector)


def _without(vector: Tensor, other: Tensor) -> Tensor:
    """`vector` minus its component along `other` (unchanged when `other` is zero)."""
    unit = _unit(other)  # [d_model]
    return vector - (vector @ unit) * unit


def layer_directions(params: EditParams, candidates: Tensor, harmless_mean: Tensor) -> Tensor:
    """Unit directions `[n_layers + 1, d_model]` float32: row l for layer l's writers, the last row for the embedding.

    `candidates` and `harmless_mean` are measure's `[position, layer, d_model]` tables (float64).
    """
    n_positions, n_layers, _ = candidates.shape
    p = params.position + n_positions
    if not 0 <= p < n_positions:
        raise UserError(f"Edit position {params.position} is outside the {n_positions} measured positions.")

    def at(layer: int) -> Tensor:
        vector = candidates[p, layer].to(COMPUTE_DTYPE)  # [d_model]
        if params.projected:
            vector = _without(vector, harmless_mean[p, layer])
        return _unit(vector)

    if params.per_layer:
        rows = [at(min(layer + 1, n_layers - 1)) for layer in range(n_layers)]
        rows.append(rows[0])
    else:
        index = min(max(params.direction_index, 0.0), n_layers - 1.0)
        low, frac = math.floor(index), index - math.floor(index)
        high = min(low + 1, n_layers - 1)
        single = _unit((1 - frac) * at(low) + frac * at(high)) if frac > 0 else at(low)
        rows = [single] * (n_layers + 1)
    return torch.stack(rows).to(torch.float32)  # [n_layers + 1, d_model]


def direction_of(edit: TensorEdit, directions: Tensor) -> Tensor:
    """The unit direction (float32) a tensor's writer uses: its layer's row, or the embedding row."""
    return directions[-1] if edit.layer is None else directions[edit.layer]


# ---- the weight edit (pure maths) ----

def edit_tensor(tensor: Tensor, u: Tensor, axis: int, weight: float, preserve_norm: bool) -> Tensor:
    """T <- T - weight (T.u) (x) u along `axis`, in float64, then (optionally) each d_model vector to its old length.

    `u` must be unit norm (or zero: nothing changes); the result has the input's dtype (cast back once).
    """
    moved = tensor.to(COMPUTE_DTYPE).movedim(axis, -1)  # [..., d_model]
    u = u.to(device=tensor.device, dtype=COMPUTE_DTYPE)  # [d_model]
    edited = moved - weight * (moved @ u).unsqueeze(-1) * u  # [..., d_model]
    if preserve_norm:
        edited = edited * _length_ratio(moved, edited)
    return edited.movedim(-1, axis).to(tensor.dtype).contiguous()


def _length_ratio(before: Tensor, after: Tensor) -> Tensor:
    """|before| / |after| per d_model vector `[..., 1]`; 1 where the edited vector is zero (nothing to rescale)."""
    old, new = before.norm(dim=-1, keepdim=True), after.norm(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(new > 0, old / new.clamp_min(torch.finfo(new.dtype).tiny), torch.ones_like(new))


def _writer_u(edit: TensorEdit, r: Tensor, needed: dict[str, Tensor]) -> Tensor:
    """r, or normalize(g * r) behind post-norms (float64); zero for a zero r (a candidate where every prompt agrees,
    so there is nothing to remove)."""
    if not bool(r.any()):
        return torch.zeros(r.shape, dtype=COMPUTE_DTYPE)
    gains = [norm_gain(needed[name], edit.gain) for name in edit.needs]
    return post_norm_direction(r.to(COMPUTE_DTYPE), gains)  # [d_model]


@dataclass
class ParameterizedEdit:
    """A recorded parameter set with its resolved directions: what `apply` writes from an edit file."""

    params: EditParams
    directions: Tensor  # [n_layers + 1, d_model] float32 unit rows
    meta: dict[str, Any] = field(default_factory=dict)

    def edit(self, edit: TensorEdit, tensor: Tensor, needed: dict[str, Tensor]) -> Tensor:
        """The edited tensor (in place, slice by slice, like `apply.edit_in_chunks`)."""
        weight = self.params.weight(edit.role, edit.layer)
        u = _writer_u(edit, direction_of(edit, self.directions), {k: v.cpu() for k, v in needed.items()})
        if weight == 0 or not bool(u.any()):
            return tensor
        # Biases are single vectors: projected, never rescaled (see the module docstring).
        preserve = self.params.preserve_norm and not _is_bias(edit)
        axis = edit.axis % tensor.dim()
        others = [dim for dim in range(tensor.dim()) if dim != axis]
        if tensor.numel() <= EDIT_CHUNK_ELEMENTS or not others:
            return edit_tensor(tensor, u, axis, weight, preserve)
        dim = others[0]
        step = max(1, EDIT_CHUNK_ELEMENTS * tensor.shape[dim] // tensor.numel())
        for start in range(0, tensor.shape[dim], step):
            part = tensor.narrow(dim, start, min(step, tensor.shape[dim] - start))
            part.copy_(edit_tensor(part, u, axis, weight, preserve))
        return tensor

    def record(self) -> dict[str, Any]:
        return {"format": EDIT_FORMAT, "params": self.params.to_dict(), **self.meta}

    def main_direction(self) -> Tensor:
        """The direction recorded as the edit's direction.json: the embedding's row (the single direction)."""
        return self.directions[-1]


def _is_bias(edit: TensorEdit) -> bool:
    return edit.name.endswith("bias") and edit.kind != "experts_fused"


def write_edit(out_dir: Path, params: EditParams, directions: Tensor, meta: dict[str, Any]) -> Path:
    """Write edit.json and its directions (exact float32) into `out_dir`; return edit.json's path."""
    from abliterate.direction import save_safetensors
    from abliterate.files import write_atomic

    save_safetensors(out_dir / EDIT_VECTORS, {"directions": directions.to(torch.float32).contiguous()}, {})
    path = out_dir / EDIT_FILE
    write_atomic(path, json.dumps({"format": EDIT_FORMAT, "params": params.to_dict(), "directions": EDIT_VECTORS,
                                   **meta}, indent=2) + "\n")
    return path


def read_edit(path: Path, plan: EditPlan | None = None) -> ParameterizedEdit | None:
    """The parameterized edit recorded at `path`, or None when `path` is not an edit file (a plain direction)."""
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(values, dict) or values.get("format") != EDIT_FORMAT:
        return None
    from safetensors.torch import load_file

    vectors = path.parent / values.get("directions", EDIT_VECTORS)
    if not vectors.is_file():
        raise UserError(f"Edit file {path} names directions {vectors.name}, which is missing; copy the whole "
                        "optimize output folder.")
    directions = load_file(str(vectors))["directions"]  # [n_layers + 1, d_model]
    if plan is not None and tuple(directions.shape) != (plan.n_layers + 1, plan.d_model):
        raise UserError(f"Edit file {path} is for {directions.shape[0] - 1} layers of width {directions.shape[1]}, "
                        f"but the model has {plan.n_layers} layers of width {plan.d_model}; pass the model it was "
                        "optimized on.")
    meta = {key: value for key, value in values.items() if key not in ("format", "params", "directions")}
    return ParameterizedEdit(EditParams.from_dict(values["params"]), directions, meta)


# ---- the same edit as hooks on a loaded model ----

def _hook(u: Tensor, weight: float, renorm: bool) -> Any:
    """Forward hook: y <- y - weight (y.u) u, and with `renorm` back to |y| (an embedding row's own length)."""
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        compute = torch.promote_types(hidden.dtype, torch.float32)
        x = hidden.to(compute)  # [..., d_model]
        unit = u.to(device=x.device, dtype=compute)  # [d_model]
        edited = x - weight * (x @ unit).unsqueeze(-1) * unit
        if renorm:
            edited = edited * _length_ratio(x, edited)
        edited = edited.to(hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited
    return hook


@contextmanager
def _swapped(parameter: nn.Parameter, value: Tensor) -> Iterator[None]:
    original = parameter.data
    parameter.data = value
    try:
        yield
    finally:
        parameter.data = original


@contextmanager
def hooked_edit(model: nn.Module, params: EditParams, directions: Tensor) -> Iterator[None]:
    """While active, `model` computes what the checkpoint written from (params, directions) computes."""
    from abliterate.hooks import memory_plan

    plan = memory_plan(model)
    named = dict(model.named_parameters())
    by_module: dict[str, list[TensorEdit]] = {}
    for edit in plan.edits.values():
        by_module.setdefault(edit.name.rsplit(".", 1)[0], []).append(edit)
    with ExitStack() as stack:
        for module_name, edits in by_module.items():
            first = edits[0]
            weight = params.weight(first.role, first.layer)
            if weight == 0:
                continue
            # Gains and directions are d_model vectors: u is computed on the CPU, moved where it is used.
            needed = {name: named[name].detach().cpu() for name in first.needs}
            u = _writer_u(first, direction_of(first, directions).cpu().to(COMPUTE_DTYPE), needed)
            if weight == 0 or not bool(u.any()):
                continue
            is_table = first.kind in ("embedding", "position_embedding")
            if params.preserve_norm and not is_table:
                for edit in edits:
                    tensor = named[edit.name]
                    if not _is_bias(edit):
                        stack.enter_context(_swapped(tensor, _rescaled(tensor.detach(), u, edit.axis, weight)))
            module = model.get_submodule(module_name)
            handle = module.register_forward_hook(_hook(u.to(torch.float32), weight, params.preserve_norm and is_table))
            stack.callback(handle.remove)
        yield


def _rescaled(tensor: Tensor, u: Tensor, axis: int, weight: float) -> Tensor:
    """The original tensor with each d_model vector scaled as the norm-preserving edit scales it (no projection).

    (W D) followed by the output hook's projection is (W - w u u^T W) D: the written weight exactly.
    """
    moved = tensor.to(COMPUTE_DTYPE).movedim(axis, -1)  # [..., d_model]
    u = u.to(device=tensor.device, dtype=COMPUTE_DTYPE)  # [d_model]
    edited = moved - weight * (moved @ u).unsqueeze(-1) * u
    return (moved * _length_ratio(moved, edited)).movedim(-1, axis).to(tensor.dtype).contiguous()
