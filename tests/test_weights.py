"""The pure edit maths: idempotent, rank-one, the direction gone afterwards, biases, fused experts, post-norms."""

import pytest
import torch

from abliterate.architectures import TensorEdit
from abliterate.weights import (
    edit_tensor,
    norm_gain,
    post_norm_direction,
    project_out,
    project_out_outputs,
    project_out_rows,
)

D_MODEL = 24


@pytest.fixture()
def r() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(D_MODEL, dtype=torch.float64)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _edit(kind: str, axis: int, needs: tuple[str, ...] = (), gain: str = "weight") -> TensorEdit:
    return TensorEdit(name="t", kind=kind, role="mlp", layer=0, axis=axis, needs=needs, gain=gain)


def test_linear_output_loses_the_direction_with_a_rank_one_change(r: torch.Tensor) -> None:
    weight = torch.randn(D_MODEL, 40, dtype=torch.float64)  # [d_model, d_in]
    edited = project_out_outputs(weight, r)
    assert (_unit(r) @ edited).abs().max() < 1e-12  # W'^T r = 0: no input can write along r
    assert torch.linalg.matrix_rank(edited - weight) == 1
    assert torch.allclose(project_out_outputs(edited, r), edited, atol=1e-14)  # idempotent


def test_rows_lose_the_direction_and_orthogonal_parts_are_unchanged(r: torch.Tensor) -> None:
    rows = torch.randn(50, D_MODEL, dtype=torch.float64)  # [vocab, d_model]
    edited = project_out_rows(rows, r)
    assert (edited @ _unit(r)).abs().max() < 1e-12
    assert torch.linalg.matrix_rank(edited - rows) == 1
    orthogonal = rows - (rows @ _unit(r)).unsqueeze(1) * _unit(r)
    assert torch.allclose(edited, orthogonal, atol=1e-12)


def test_bias_loses_the_direction(r: torch.Tensor) -> None:
    bias = torch.randn(D_MODEL, dtype=torch.float64)
    edited = edit_tensor(_edit("linear", 0), bias, r, {})
    assert abs(float(edited @ _unit(r))) < 1e-12
    assert torch.allclose(edited, bias - (bias @ _unit(r)) * _unit(r), atol=1e-14)


def test_conv1d_is_the_transpose_of_linear(r: torch.Tensor) -> None:
    weight = torch.randn(D_MODEL, 40, dtype=torch.float64)  # nn.Linear [d_model, d_in]
    conv = weight.T.contiguous()  # GPT-2 Conv1D [d_in, d_model]
    assert torch.allclose(edit_tensor(_edit("conv1d", 1), conv, r, {}), project_out_outputs(weight, r).T, atol=1e-13)


@pytest.mark.parametrize("axis", [1, 2])
def test_fused_experts_in_both_orientations(r: torch.Tensor, axis: int) -> None:
    # [experts, d_model, inter] (most families) or [experts, inter, d_model] (gpt-oss, Llama 4); square on purpose,
    # as real gpt-oss experts are, so only the axis says which side is d_model.
    experts = torch.randn(3, D_MODEL, D_MODEL, dtype=torch.float64)
    edited = edit_tensor(_edit("experts_fused", axis), experts, r, {})
    for e in range(3):
        single = experts[e] if axis == 1 else experts[e].T  # as a [d_model, inter] linear weight
        expected = project_out_outputs(single, r)
        assert torch.allclose(edited[e] if axis == 1 else edited[e].T, expected, atol=1e-12)
    # Each expert's output x @ W_e (axis 2) or W_e @ x (axis 1) is orthogonal to r.
    x = torch.randn(D_MODEL, dtype=torch.float64)
    outputs = edited @ x if axis == 1 else x @ edited  # [experts, d_model]
    assert (outputs @ _unit(r)).abs().max() < 1e-11


def test_fused_expert_biases(r: torch.Tensor) -> None:
    biases = torch.randn(4, D_MODEL, dtype=torch.float64)  # [experts, d_model]
    edited = edit_tensor(_edit("experts_bias", 1), biases, r, {})
    assert (edited @ _unit(r)).abs().max() < 1e-12


def test_low_precision_is_computed_wide_and_cast_back_once(r: torch.Tensor) -> None:
    weight = torch.randn(D_MODEL, 40).to(torch.bfloat16)
    edited = edit_tensor(_edit("linear", 0), weight, r, {})
    assert edited.dtype == torch.bfloat16
    wide = project_out(weight.double(), r, 0).to(torch.bfloat16)
    assert torch.equal(edited, wide)  # one rounding at the end, not one per step


def _rms_norm(y: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return gain * y / y.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


@pytest.mark.parametrize("convention", ["weight", "one_plus_weight"])
def test_post_norm_output_is_exactly_orthogonal(r: torch.Tensor, convention: str) -> None:
    norm_weight = torch.randn(D_MODEL, dtype=torch.float64)
    weight = torch.randn(D_MODEL, 40, dtype=torch.float64)
    edited = edit_tensor(_edit("linear", 0, ("n",), convention), weight, r, {"n": norm_weight})
    x = torch.randn(100, 40, dtype=torch.float64)
    out = _rms_norm(x @ edited.T, norm_gain(norm_weight, convention))  # [batch, d_model]
    cosine = (out @ _unit(r)) / out.norm(dim=-1)
    assert cosine.abs().max() < 1e-12
    # Orthogonalizing against r itself would not be enough behind a norm with a non-uniform gain.
    naive = _rms_norm(x @ project_out_outputs(weight, r).T, norm_gain(norm_weight, convention))
    assert ((naive @ _unit(r)) / naive.norm(dim=-1)).abs().max() > 1e-3


def test_nested_post_norms_multiply_their_gains(r: torch.Tensor) -> None:
    inner, outer = torch.randn(D_MODEL, dtype=torch.float64), torch.randn(D_MODEL, dtype=torch.float64)
    weight = torch.randn(D_MODEL, 40, dtype=torch.float64)
    edited = edit_tensor(_edit("linear", 0, ("a", "b")), weight, r, {"a": inner, "b": outer})
    out = _rms_norm(_rms_norm(torch.randn(50, 40, dtype=torch.float64) @ edited.T, inner), outer)
    assert ((out @ _unit(r)) / out.norm(dim=-1)).abs().max() < 1e-12


def test_post_norm_direction_is_unit_and_parallel_to_gain_times_r(r: torch.Tensor) -> None:
    gain = torch.rand(D_MODEL, dtype=torch.float64) + 0.5
    u = post_norm_direction(r, [gain])
    assert torch.allclose(u.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(u, _unit(gain * r))
