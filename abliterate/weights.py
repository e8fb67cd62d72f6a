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

Compute is float64 here (the tensors are edited once, offline) and the result is cast back to the stored dtype once;
it runs block by block in cache-sized float64 scratch, so it costs about what reading the tensor costs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from abliterate.architectures import TensorEdit

COMPUTE_DTYPE = torch.float64
# Values per block of float64 scratch: 2**16 (512 KB) stays in the CPU's L2 cache, where converting to float64 and
# back costs about as much as reading and writing the stored dtype.
BLOCK_ELEMENTS = 2**16


def unit(vector: Tensor) -> Tensor:
    """`vector` as a float64 unit vector; a zero or non-finite vector is a programming error here."""
    vector = vector.to(COMPUTE_DTYPE).flatten()  # [d_model]
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction must be finite and non-zero")
    return vector / norm


def project_out(tensor: Tensor, direction: Tensor, axis: int, out: Tensor | None = None) -> Tensor:
    """Remove the component along `direction` of `tensor`'s `axis`: T <- T - (T . u) (x) u, in float64.

    The result has the input's dtype (cast back once); it is written into `out` when given (contiguous, of the
    input's dtype and shape; `tensor` itself edits in place). `direction` need not be unit norm. The arithmetic is
    done a block of `BLOCK_ELEMENTS` values at a time in reused float64 scratch, so no full-size float64 copy is
    made and the wide arithmetic runs in the CPU cache; every value still goes through the same float64 operations.
    Each block is read before its result is written, so editing in place gives the same values.
    """
    u = unit(direction)  # [d_model]
    shape = tuple(tensor.shape)
    axis = axis % len(shape)
    lead, d_model, trail = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    result = torch.empty(shape, dtype=tensor.dtype) if out is None else out
    if trail == 1:  # d_model is the last axis: rows (embeddings, Conv1D, biases, experts stored [.., d_model])
        _project_rows(tensor.reshape(lead, d_model), u, result.view(lead, d_model))
    else:  # d_model is followed by other axes: linear weights [d_model, d_in], experts [experts, d_model, inter]
        source, out = tensor.reshape(lead, d_model, trail), result.view(lead, d_model, trail)
        for index in range(lead):
            _project_columns(source[index], u, out[index])
    return result


def _project_rows(rows: Tensor, u: Tensor, out: Tensor) -> None:
    """out[i] = rows[i] - (rows[i] . u) u for rows [n, d_model], a block of rows at a time."""
    step = max(1, BLOCK_ELEMENTS // rows.shape[1])
    scratch = torch.empty((2, min(step, rows.shape[0]), rows.shape[1]), dtype=COMPUTE_DTYPE)  # [2, step, d_model]
    for start in range(0, rows.shape[0], step):
        block = scratch[0, : min(step, rows.shape[0] - start)]  # [block, d_model]
        block.copy_(rows[start:start + step])
        coefficient = block @ u  # [block]
        change = torch.mul(coefficient.unsqueeze(1), u, out=scratch[1, : block.shape[0]])  # [block, d_model]
        out[start:start + step].copy_(block.sub_(change))


def _project_columns(matrix: Tensor, u: Tensor, out: Tensor) -> None:
    """out[:, j] = matrix[:, j] - (u . matrix[:, j]) u for a matrix [d_model, n]: one pass for the coefficients
    (u^T M, accumulated a block of rows at a time), one pass for the rank-one update."""
    step = max(1, BLOCK_ELEMENTS // matrix.shape[1])
    scratch = torch.empty((2, min(step, matrix.shape[0]), matrix.shape[1]), dtype=COMPUTE_DTYPE)  # [2, step, n]
    coefficient = torch.zeros(matrix.shape[1], dtype=COMPUTE_DTYPE)  # [n]
    for start in range(0, matrix.shape[0], step):
        block = scratch[0, : min(step, matrix.shape[0] - start)]  # [block, n]
        block.copy_(matrix[start:start + step])
        coefficient.addmv_(block.T, u[start:start + step])
    for start in range(0, matrix.shape[0], step):
        block = scratch[0, : min(step, matrix.shape[0] - start)]  # [block, n]
        block.copy_(matrix[start:start + step])
        change = torch.mul(u[start:start + step].unsqueeze(1), coefficient, out=scratch[1, : block.shape[0]])
        out[start:start + step].copy_(block.sub_(change))


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


def edit_tensor(edit: TensorEdit, tensor: Tensor, direction: Tensor, needed: dict[str, Tensor],
                out: Tensor | None = None) -> Tensor:
    """Apply one planned edit to `tensor` (any float dtype), reading post-norm weights from `needed`; the result is
    written into `out` when given (as `project_out`)."""
    if edit.needs:
        missing = [name for name in edit.needs if name not in needed]
        if missing:
            raise KeyError(f"edit of {edit.name} needs tensors {missing}")
        direction = post_norm_direction(direction, [norm_gain(needed[name], edit.gain) for name in edit.needs])
        if direction.norm() == 0:
            return tensor.clone() if out is None else out.copy_(tensor)
    return project_out(tensor, direction, edit.axis, out)
