"""The exact weight edit: pure maths that removes a direction from the tensors writing into the residual stream.

Every residual writer is a tensor with one axis in d_model (see `abliterate.architectures.KIND_AXES`). Removing the
unit direction u along that axis, T <- T - (T .u) (x) u, makes everything the tensor adds to the residual orthogonal
to u: for a linear weight [d_model, d_in] this is W <- W - u u^T W, for a bias b <- b - (b.u) u, for embedding rows
and GPT-2's transposed Conv1D [d_in, d_model] it is W <- W - (W u) u^T, and for fused experts it is the same per
expert along the family's d_model axis.

Sandwich norms. When a norm sits between a writer's output y and the residual add (Gemma 2/3, OLMo 2, Gemma 4), the
residual receives norm(y) = g * y / rms(y) (elementwise gain g; nested norms multiply their gains). Then
    norm(y) . r = sum_i g_i y_i r_i / rms(y) = y . (g * r) / rms(y),
so making the writer orthogonal to u = normalize(g * r) (instead of r) makes the norm's output exactly orthogonal to
r, whatever the input. Gemma 1/2/3 scale by (1 + weight); OLMo 2 and Gemma 4 by weight.

Compute is float64 here (the tensors are edited once, offline) and the result is cast back to the stored dtype once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from abliterate.architectures import TensorEdit

COMPUTE_DTYPE = torch.float64


def unit(vector: Tensor) -> Tensor:
    """`vector` as a float64 unit vector; a zero or non-finite vector is a programming error here."""
    vector = vector.to(COMPUTE_DTYPE).flatten()  # [d_model]
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction must be finite and non-zero")
    return vector / norm


def project_out(tensor: Tensor, direction: Tensor, axis: int) -> Tensor:
    """Remove the component along `direction` of `tensor`'s `axis`: T <- T - (T . u) (x) u, in float64.

    The result has the input's dtype (cast back once). `direction` need not be unit norm.
    """
    u = unit(direction)  # [d_model]
    moved = tensor.to(COMPUTE_DTYPE).movedim(axis, -1)  # [..., d_model]
    coefficient = moved @ u  # [...]
    edited = moved - coefficient.unsqueeze(-1) * u  # [..., d_model]
    return edited.movedim(-1, axis).to(tensor.dtype).contiguous()


def project_out_rows(matrix: Tensor, direction: Tensor) -> Tensor:
    """Embedding / Conv1D rows [n, d_model]: W <- W - (W u) u^T."""
    return project_out(matrix, direction, axis=1)


def project_out_outputs(weight: Tensor, direction: Tensor) -> Tensor:
    """Linear weight [d_model, d_in] (or bias [d_model]): W <- W - u u^T W."""
    return project_out(weight, direction, axis=0)


def norm_gain(weight: Tensor, convention: str) -> Tensor:
    """A norm's effective elementwise gain in float64: `weight` or `1 + weight` (Gemma 1/2/3)."""
    weight = weight.to(COMPUTE_DTYPE)  # [d_model]
    if convention == "one_plus_weight":
        return 1.0 + weight
    if convention == "weight":
        return weight
    raise ValueError(f"unknown norm gain convention {convention!r}")


def post_norm_direction(direction: Tensor, gains: list[Tensor]) -> Tensor:
    """u = normalize(g * r) with g the product of the gains of the norms after a writer (see the module docstring)."""
    scaled = unit(direction)  # [d_model]
    for gain in gains:
        scaled = scaled * gain.to(COMPUTE_DTYPE)  # [d_model]
    if scaled.norm() == 0:
        # Every gain on r's support is zero: the norm's output already has no component along r.
        return scaled
    return scaled / scaled.norm()


def edit_tensor(edit: TensorEdit, tensor: Tensor, direction: Tensor, needed: dict[str, Tensor]) -> Tensor:
    """Apply one planned edit to `tensor` (any float dtype), reading post-norm weights from `needed`."""
    if edit.needs:
        missing = [name for name in edit.needs if name not in needed]
        if missing:
            raise KeyError(f"edit of {edit.name} needs tensors {missing}")
        direction = post_norm_direction(direction, [norm_gain(needed[name], edit.gain) for name in edit.needs])
        if direction.norm() == 0:
            return tensor.clone()
    return project_out(tensor, direction, edit.axis)
