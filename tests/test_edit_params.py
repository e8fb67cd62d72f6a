"""The parameterized edit: the model the search scores (hooks) is the checkpoint `apply` writes, in every family.

For every tiny model: random per-layer candidates and harmless means, two parameter sets (per-layer projected
directions with norm preservation and uneven kernels; an interpolated direction with a partial embedding weight),
written by the streaming `apply` from the recorded edit file and compared, logit for logit, with the original model
under `hooked_edit`. The pure maths is checked on its own: rank one, the direction gone at full weight, each write
vector's length kept with norm preservation, and the paper's parameters giving the paper's edit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_architectures import left_padded_batch
from tiny_models import TINY_MODELS, build_tiny, model_class, read_tensors, save_tiny

from abliterate.apply import apply_direction
from abliterate.config import load_config
from abliterate.edit_params import EditParams, Kernel, edit_tensor, hooked_edit, layer_directions, write_edit
from abliterate.hooks import ablate_direction, memory_plan

ALL = sorted(TINY_MODELS)

SEARCHED = EditParams(position=-1, direction_index=0.0, per_layer=True, projected=True, preserve_norm=True,
                      mixer=Kernel(1.3, 1.0, 0.4, 1.5), mlp=Kernel(0.9, 0.0, 0.2, 2.0), embed_weight=0.7)
INTERPOLATED = EditParams(position=-2, direction_index=0.6, mixer=Kernel(1.0, 0.5, 0.5, 0.7),
                          mlp=Kernel(1.2, 1.0, 0.0, 1.0), embed_weight=0.5)


def tables(d_model: int, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    candidates = torch.randn(2, n_layers, d_model, generator=generator, dtype=torch.float64)  # [pos, layer, d]
    harmless = torch.randn(2, n_layers, d_model, generator=generator, dtype=torch.float64)
    return candidates, harmless


@pytest.fixture(autouse=True)
def quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_written_checkpoint_equals_the_hooked_model_the_search_scores(name: str, tmp_path: Path) -> None:
    original = build_tiny(name)
    plan = memory_plan(original)
    source = save_tiny(original, tmp_path / "source")
    candidates, harmless = tables(plan.d_model, plan.n_layers)
    batch = left_padded_batch()
    mask = batch["attention_mask"].bool()
    unedited = original(**batch).logits[mask]  # [tokens, vocab]
    for i, params in enumerate((SEARCHED, INTERPOLATED)):
        directions = layer_directions(params, candidates, harmless)  # [n_layers + 1, d_model]
        folder = tmp_path / f"edit{i}"
        folder.mkdir()
        edit_file = write_edit(folder, params, directions, {})
        out = tmp_path / f"edited{i}"
        record = apply_direction(str(source), edit_file, out, load_config())
        assert record["parameterized_edit"]["params"] == params.to_dict()
        with hooked_edit(original, params, directions):
            hooked = original(**batch).logits[mask]
        edited = model_class(TINY_MODELS[name]).from_pretrained(out, dtype=torch.float32).eval()
        logits = edited(**batch).logits[mask]
        scale = hooked.abs().max()
        assert (logits - hooked).abs().max() < 1e-4 * scale, f"{name} params {i}"
        assert (unedited - hooked).abs().max() > 1e-3 * scale  # the edit does change the model
    # Hooks are gone and swapped parameters restored on exit.
    assert torch.equal(original(**batch).logits[mask], unedited)


@torch.no_grad()
def test_the_papers_parameters_are_the_papers_edit(tmp_path: Path) -> None:
    original = build_tiny("gemma2")
    plan = memory_plan(original)
    candidates, harmless = tables(plan.d_model, plan.n_layers)
    params = EditParams.paper(layer=1, position=-1)
    directions = layer_directions(params, candidates, harmless)
    assert torch.allclose(directions[0].double(), candidates[1, 1] / candidates[1, 1].norm(), atol=1e-7)
    batch = left_padded_batch()
    with hooked_edit(original, params, directions):
        hooked = original(**batch).logits
    with ablate_direction(original, candidates[1, 1]):
        paper = original(**batch).logits
    assert torch.allclose(hooked, paper, atol=1e-5 * paper.abs().max())
    source = save_tiny(original, tmp_path / "source")
    folder = tmp_path / "edit"
    folder.mkdir()
    apply_direction(str(source), write_edit(folder, params, directions, {}), tmp_path / "a", load_config())
    direction_file = tmp_path / "direction.json"
    direction_file.write_text(json.dumps({"direction": directions[0].tolist()}))
    apply_direction(str(source), direction_file, tmp_path / "b", load_config())
    from_params, plain = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert all(torch.allclose(from_params[k], plain[k], atol=1e-7) for k in plain)


def test_the_edit_is_rank_one_and_removes_u_at_full_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64)  # [d_model, d_in]
    u = torch.randn(16, generator=generator, dtype=torch.float64)
    u = u / u.norm()
    half = edit_tensor(weight, u, axis=0, weight=0.5, preserve_norm=False)
    assert torch.linalg.matrix_rank((half - weight).double()) == 1
    full = edit_tensor(weight, u, axis=0, weight=1.0, preserve_norm=False)
    assert (u @ full).abs().max() < 1e-12


def test_norm_preservation_keeps_each_write_vector_length_and_orthogonality() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 24, generator=generator)  # [d_model, d_in]: column j is what input unit j writes
    u = torch.randn(16, generator=generator, dtype=torch.float64)
    u = u / u.norm()
    kept = edit_tensor(weight, u, axis=0, weight=1.0, preserve_norm=True)
    assert torch.allclose(kept.norm(dim=0), weight.norm(dim=0), rtol=1e-5)
    assert (u.float() @ kept).abs().max() < 1e-5
    plain = edit_tensor(weight, u, axis=0, weight=1.0, preserve_norm=False)
    assert not torch.allclose(kept, plain)
