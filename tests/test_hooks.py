"""In-memory hooks on every tiny model: the right layers, exact activation addition, and ablation that leaves no r."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import TINY_MODELS, build_tiny

from abliterate.hooks import ablate_direction, add_direction, capture_layer_inputs, decoder_layers, memory_plan

ALL = sorted(TINY_MODELS)


@pytest.fixture(scope="module", params=ALL)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return build_tiny(request.param)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))  # [batch, pos]
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def test_decoder_layers_are_the_text_decoders_layers(model: torch.nn.Module) -> None:
    layers = decoder_layers(model)
    plan = memory_plan(model)
    assert len(layers) == plan.n_layers
    named = dict(model.named_modules())
    assert [named[f"{plan.layers_prefix}{i}"] for i in range(plan.n_layers)] == layers


@torch.no_grad()
def test_add_direction_adds_the_raw_vector_at_that_layer_only(model: torch.nn.Module) -> None:
    batch = _batch()
    d_model = memory_plan(model).d_model
    vector = 3.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(4))  # not unit norm on purpose
    with capture_layer_inputs(model) as base:
        model(**batch)
        base = dict(base)
    with add_direction(model, vector, layer=1), capture_layer_inputs(model) as added:
        model(**batch)
    assert torch.equal(added[0], base[0])  # earlier layers untouched
    assert torch.allclose(added[1] - base[1], vector.expand_as(base[1]), atol=1e-5)
    with capture_layer_inputs(model) as after:
        model(**batch)
    assert torch.equal(after[1], base[1])  # the hook is gone on exit


@torch.no_grad()
def test_ablation_leaves_no_component_along_r_anywhere(model: torch.nn.Module) -> None:
    batch = _batch()
    mask = batch["attention_mask"].bool()
    r = torch.randn(memory_plan(model).d_model, generator=torch.Generator().manual_seed(5))
    with ablate_direction(model, r), capture_layer_inputs(model) as captured:
        model(**batch)
    for where, hidden in captured.items():
        real = hidden[mask]  # [tokens, d_model]
        cosine = (real @ r).abs() / (real.norm(dim=-1) * r.norm())
        assert cosine.max() < 1e-5, f"input {where} keeps r under ablation"
    with capture_layer_inputs(model) as plain:
        model(**batch)
    assert (plain[len(captured) - 1][mask] @ r).abs().max() > 1e-3  # without hooks r is there


def test_a_zero_direction_is_rejected_before_any_hook_is_registered() -> None:
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="zero or non-finite"), ablate_direction(model, torch.zeros(32)):
        pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
