"""Per-architecture correctness of the weight edit, end to end through `apply.apply_direction`.

For every tiny model in tests/tiny_models.py (dense, MoE, hybrid and multimodal families): save it
(single file and several shards), apply a random direction, and check that (1) the edited model's residual stream has
no component along r at every layer input and the final norm's input, on a left-padded batch; (2) in every family,
sandwich norms included, the edited logits equal the original model under selection's ablation hooks (the model
that was scored is the model that is written); (3) every tensor that is not a
residual writer is bit-identical and the output layer equals the original (written explicitly when it was tied);
(4) the output loads with transformers and generates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch
from tiny_models import TESTED_ELSEWHERE, TINY_MODELS, TinyModel, build_tiny, model_class, read_tensors, save_tiny

from abliterate.apply import apply_direction
from abliterate.architectures import ARCHITECTURES, EditPlan, TensorInfo, plan_edits
from abliterate.config import load_config
from abliterate.errors import UserError
from abliterate.hooks import ablate_direction, capture_layer_inputs

ALL = sorted(TINY_MODELS)


@dataclass
class Case:
    tiny: TinyModel
    original: torch.nn.Module
    source: Path
    edited: Path
    direction: torch.Tensor  # [d_model], unit norm, float32
    plan: EditPlan

    @cached_property
    def edited_model(self) -> torch.nn.Module:
        """The output checkpoint loaded with transformers (once per family: the tests only read it)."""
        return model_class(self.tiny).from_pretrained(self.edited, dtype=torch.float32).eval()


def checkpoint_plan(folder: Path) -> EditPlan:
    tensors = read_tensors(folder)
    infos = {name: TensorInfo(tuple(t.shape), str(t.dtype)) for name, t in tensors.items()}
    return plan_edits(json.loads((folder / "config.json").read_text()), infos)


def apply(source: Path, direction: torch.Tensor, out_dir: Path, max_shard_size: str = "5GB") -> Path:
    direction_file = out_dir.parent / f"{out_dir.name}-direction.json"
    direction_file.write_text(json.dumps({"direction": direction.tolist()}))
    config = load_config(overrides={"apply": {"max_shard_size": max_shard_size}})
    apply_direction(str(source), direction_file, out_dir, config)
    return out_dir


@pytest.fixture(scope="module", params=ALL)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    name = request.param
    original = build_tiny(name)
    root = tmp_path_factory.mktemp(name)
    source = save_tiny(original, root / "source")
    plan = checkpoint_plan(source)
    direction = torch.randn(plan.d_model, generator=torch.Generator().manual_seed(1))
    direction = direction / direction.norm()
    return Case(TINY_MODELS[name], original, source, apply(source, direction, root / "edited"), direction, plan)


def left_padded_batch() -> dict[str, torch.Tensor]:
    """Three prompts, two of them left-padded, with position ids counted from each prompt's first real token
    (as `generate` does), so absolute-position families (GPT-2) see the same positions in both paths."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (3, 7), generator=generator)  # [batch, pos]; ids below 100 avoid special tokens
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    ids[2, :4], mask[2, :4] = 0, 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


@torch.no_grad()
def test_residual_stream_has_no_component_along_r(case: Case) -> None:
    model = case.edited_model
    batch = left_padded_batch()
    mask = batch["attention_mask"]
    with capture_layer_inputs(model) as captured:
        model(**batch)
    assert sorted(captured) == list(range(case.plan.n_layers + 1))  # every layer input and the final norm's input
    for where, hidden in captured.items():
        real = hidden[mask.bool()]  # [tokens, d_model]
        cosine = (real @ case.direction).abs() / real.norm(dim=-1)
        assert cosine.max() < 1e-5, f"{case.tiny.name}: residual at input {where} keeps r (|cos| {cosine.max():.2e})"


@torch.no_grad()
def test_edited_logits_equal_hooked_ablation(case: Case) -> None:
    batch = left_padded_batch()
    mask = batch["attention_mask"]
    with ablate_direction(case.original, case.direction):
        expected = case.original(**batch).logits[mask.bool()]  # [tokens, vocab]
    model = case.edited_model
    logits = model(**batch).logits[mask.bool()]
    unedited = case.original(**batch).logits[mask.bool()]
    scale = expected.abs().max()
    assert (logits - expected).abs().max() < 1e-4 * scale
    assert (unedited - expected).abs().max() > 1e-3 * scale  # the ablation does change this model


def test_only_residual_writers_change_and_the_output_layer_is_original(case: Case) -> None:
    before, after = read_tensors(case.source), read_tensors(case.edited)
    expected_names = set(before) | ({case.plan.untie[1]} if case.plan.untie else set())
    assert set(after) == expected_names
    for name, tensor in before.items():
        if name in case.plan.edits:
            assert not torch.equal(after[name], tensor), f"writer {name} was not edited"
        else:
            assert torch.equal(after[name], tensor), f"{name} is not a residual writer but changed"
    if case.plan.untie:
        embedding, lm_head = case.plan.untie
        assert torch.equal(after[lm_head], before[embedding])
    config = json.loads((case.edited / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config.get("text_config", {}).get("tie_word_embeddings", False) is False


@torch.no_grad()
def test_output_loads_and_generates_greedily_from_its_own_logits(case: Case) -> None:
    model = case.edited_model
    batch = left_padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(**batch).logits[:, -1]  # [batch, vocab]
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert generated.shape == (3, ids.shape[1] + 2)
    assert torch.equal(generated[:, ids.shape[1]], logits.argmax(-1))
    # The output layer really is the original one: on the same final hidden states it gives the same logits.
    head_after = model.get_output_embeddings().weight
    assert torch.equal(head_after, case.original.get_output_embeddings().weight)


def test_multi_shard_checkpoint_gives_the_same_edit(case: Case, tmp_path: Path) -> None:
    sharded = save_tiny(case.original, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    edited = apply(sharded, case.direction, tmp_path / "edited", max_shard_size="20KB")
    assert (edited / "model.safetensors.index.json").exists()
    single, multi = read_tensors(case.edited), read_tensors(edited)
    assert single.keys() == multi.keys()
    assert all(torch.equal(single[name], multi[name]) for name in single)


def test_every_supported_family_has_a_tiny_model() -> None:
    supported = {name for name, entry in ARCHITECTURES.items() if not entry.refuse}
    covered = {tiny.model_type for tiny in TINY_MODELS.values()} | set(TESTED_ELSEWHERE)
    assert sorted(supported - covered) == []


# ---- the plan on its own: refusals and layouts, from synthetic tensor lists ---------------------------------------

def llama_tensors(n_layers: int = 2, d_model: int = 8, skip: tuple[str, ...] = ()) -> dict[str, TensorInfo]:
    names = {"model.embed_tokens.weight": (16, d_model), "model.norm.weight": (d_model,), "lm_head.weight": (16, d_model)}
    for i in range(n_layers):
        names[f"model.layers.{i}.self_attn.o_proj.weight"] = (d_model, d_model)
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (d_model, d_model)
        names[f"model.layers.{i}.mlp.down_proj.weight"] = (d_model, 12)
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (12, d_model)
    return {name: TensorInfo(shape, "F32") for name, shape in names.items() if name not in skip}


LLAMA_CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8}


def test_plan_of_a_llama_checkpoint_names_every_writer() -> None:
    plan = plan_edits(LLAMA_CONFIG, llama_tensors())
    assert sorted(plan.edits) == ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                                  "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.layers.1.self_attn.o_proj.weight"]
    assert plan.untie is None and plan.per_layer == {0: plan.per_layer[0], 1: plan.per_layer[1]}
    assert any("layer 1" in line and "o_proj" in line for line in plan.describe())


def test_unknown_model_type_lists_the_supported_ones() -> None:
    with pytest.raises(UserError, match=r"Unsupported model_type 'mamba_x'.*Supported: .*gemma2.*llama"):
        plan_edits({**LLAMA_CONFIG, "model_type": "mamba_x"}, llama_tensors())


def test_a_layer_without_a_writer_is_refused_not_skipped() -> None:
    tensors = llama_tensors(skip=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(UserError, match="Layer 1 of this llama checkpoint has no mlp residual writer"):
        plan_edits(LLAMA_CONFIG, tensors)


def test_an_unclaimed_output_projection_is_refused() -> None:
    tensors = {**llama_tensors(), "model.layers.0.mlp.shared_expert.down_proj.weight": TensorInfo((8, 12), "F32")}
    with pytest.raises(UserError, match="shared_expert.down_proj.weight looks like an output projection"):
        plan_edits(LLAMA_CONFIG, tensors)


def test_a_writer_with_the_wrong_shape_is_refused() -> None:
    tensors = {**llama_tensors(), "model.layers.0.self_attn.o_proj.weight": TensorInfo((6, 8), "F32")}
    with pytest.raises(UserError, match=r"o_proj.weight has shape \[6, 8\].*d_model=8 on axis 0"):
        plan_edits(LLAMA_CONFIG, tensors)


def test_gemma3n_altup_is_refused() -> None:
    with pytest.raises(UserError, match="not a single stream"):
        plan_edits({"model_type": "gemma3n", "text_config": {}}, {})


def test_missing_output_layer_without_a_tie_is_refused() -> None:
    tensors = llama_tensors(skip=("lm_head.weight",))
    assert plan_edits(LLAMA_CONFIG, tensors).untie == ("model.embed_tokens.weight", "lm_head.weight")
    with pytest.raises(UserError, match="no output layer lm_head.weight"):
        plan_edits({**LLAMA_CONFIG, "tie_word_embeddings": False}, tensors)


def test_layers_beyond_the_config_are_reported_not_edited() -> None:
    tensors = llama_tensors(3)
    plan = plan_edits(LLAMA_CONFIG, tensors)
    assert not any(".layers.2." in name for name in plan.edits)
    assert any("layer 2 is beyond num_hidden_layers=2" in line for line in plan.describe())


def test_gemma3_multimodal_edits_only_the_language_model_in_both_layouts() -> None:
    config = {"model_type": "gemma3", "text_config": {"num_hidden_layers": 1, "hidden_size": 8}}
    layer = {"self_attn.o_proj.weight": (8, 8), "mlp.down_proj.weight": (8, 4),
             "post_attention_layernorm.weight": (8,), "post_feedforward_layernorm.weight": (8,)}
    for prefix in ("model.language_model.", "language_model.model."):
        tensors = {f"{prefix}embed_tokens.weight": (16, 8), "vision_tower.encoder.layers.0.out_proj.weight": (8, 8),
                   **{f"{prefix}layers.0.{name}": shape for name, shape in layer.items()}}
        plan = plan_edits(config, {name: TensorInfo(shape, "BF16") for name, shape in tensors.items()})
        assert len(plan.edits) == 3 and all(name.startswith(prefix) for name in plan.edits)
        assert plan.edits[f"{prefix}layers.0.mlp.down_proj.weight"].needs == (
            f"{prefix}layers.0.post_feedforward_layernorm.weight",)
        assert plan.untie[1] == ("lm_head.weight" if prefix == "model.language_model." else "language_model.lm_head.weight")
        updated = plan.config_updates(config)
        assert updated["tie_word_embeddings"] is False and updated["text_config"]["tie_word_embeddings"] is False


def test_a_post_norm_with_a_bias_is_refused() -> None:
    config = {"model_type": "olmo2", "num_hidden_layers": 1, "hidden_size": 8}
    tensors = {name: TensorInfo(shape, "F32") for name, shape in {
        "model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 8), "model.layers.0.mlp.down_proj.weight": (8, 4),
        "model.layers.0.post_attention_layernorm.weight": (8,), "model.layers.0.post_feedforward_layernorm.weight": (8,),
        "model.layers.0.post_feedforward_layernorm.bias": (8,)}.items()}
    with pytest.raises(UserError, match="post_feedforward_layernorm.bias.*bias-free RMSNorm"):
        plan_edits(config, tensors)
    del tensors["model.layers.0.post_feedforward_layernorm.bias"]
    assert plan_edits(config, tensors).edits["model.layers.0.mlp.down_proj.weight"].needs == (
        "model.layers.0.post_feedforward_layernorm.weight",)


def test_an_unclaimed_embedding_table_is_refused() -> None:
    tensors = {**llama_tensors(), "model.embed_positions.weight": TensorInfo((64, 8), "F32")}
    with pytest.raises(UserError, match="embed_positions.weight looks like an embedding table"):
        plan_edits(LLAMA_CONFIG, tensors)


def test_gpt2_hub_layout_without_the_transformer_prefix() -> None:
    # The original openai-community/gpt2 checkpoint stores wte/wpe/h.N at the top level, plus attention-mask buffers.
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8}
    tensors = {name: TensorInfo(shape, "F32") for name, shape in {
        "wte.weight": (16, 8), "wpe.weight": (32, 8), "ln_f.weight": (8,), "h.0.attn.bias": (1, 1, 32, 32),
        "h.0.attn.c_attn.weight": (8, 24), "h.0.attn.c_proj.weight": (8, 8), "h.0.attn.c_proj.bias": (8,),
        "h.0.mlp.c_fc.weight": (8, 32), "h.0.mlp.c_proj.weight": (32, 8), "h.0.mlp.c_proj.bias": (8,)}.items()}
    plan = plan_edits(config, tensors)
    assert sorted(plan.edits) == ["h.0.attn.c_proj.bias", "h.0.attn.c_proj.weight", "h.0.mlp.c_proj.bias",
                                  "h.0.mlp.c_proj.weight", "wpe.weight", "wte.weight"]
    assert plan.edits["h.0.mlp.c_proj.weight"].axis == 1  # Conv1D stores [d_in, d_model]
    assert plan.untie == ("wte.weight", "lm_head.weight")
