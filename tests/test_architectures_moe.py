"""What is specific to the MoE, hybrid and multimodal families, beyond the generic suite in test_architectures.py.

- The plan of every family names exactly the residual writers its modeling code has, layer by layer (dense and MoE
  layers, shared experts, linear-attention / Mamba / short-convolution mixers, Gemma 4's per-layer projection).
- Experts stored per expert (as save_pretrained and the Hub store Mixtral, Qwen MoE, DeepSeek...) and the same
  experts stored fused (as transformers holds them in memory, and as some Hub checkpoints ship them) get the same edit.
- gpt-oss and Llama 4 experts are [experts, inter, d_model] and square here, as real gpt-oss's are: the plan uses the
  declared axis, and the edited experts' outputs are orthogonal to r while the other axis would not be.
- Gemma 4's nested MoE post-norms: the exact edit needs the product of both gains; the outer gain alone leaves r.
- The multimodal Llama 4 wrapper (whose forward is broken in transformers 5.24) is checked through its language model.
- A gpt-oss MXFP4 checkpoint is refused rather than edited partly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny, llama4_multimodal_config, read_tensors, save_tiny
from transformers import AutoModelForCausalLM, Llama4ForConditionalGeneration

from abliterate import architectures
from abliterate.apply import apply_direction
from abliterate.architectures import TensorInfo, plan_edits
from abliterate.config import load_config
from abliterate.errors import UserError
from abliterate.hooks import ablate_direction, capture_layer_inputs

E = "*"  # stands for every expert index 0..3 in the expected plans below

# Per layer, the residual writers (relative to the layer) that the on-disk plan must contain: nothing more or less.
EXPECTED_WRITERS = {
    "qwen2_moe": [["self_attn.o_proj.weight", "mlp.down_proj.weight"],
                  ["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight", "mlp.shared_expert.down_proj.weight"]],
    "qwen3_moe": [["self_attn.o_proj.weight", "mlp.down_proj.weight"],
                  ["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight"]],
    "mixtral": [["self_attn.o_proj.weight", "block_sparse_moe.experts.*.w2.weight"]] * 2,
    "phimoe": [["self_attn.o_proj.weight", "block_sparse_moe.experts.*.w2.weight"]] * 2,
    "minimax_m2": [["self_attn.o_proj.weight", "block_sparse_moe.experts.*.w2.weight"]] * 2,
    "olmoe": [["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight"]] * 2,
    "flex_olmo": [["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight"]] * 2,
    "hunyuan_v1_moe": [["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight",
                        "mlp.shared_mlp.down_proj.weight"]] * 2,
    "deepseek_v2": [["self_attn.o_proj.weight", "mlp.down_proj.weight"],
                    ["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight",
                     "mlp.shared_experts.down_proj.weight"]],
    "gpt_oss": [["self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.experts.down_proj",
                 "mlp.experts.down_proj_bias"]] * 2,
    "llama4_text": [["self_attn.o_proj.weight", "feed_forward.down_proj.weight"],
                    ["self_attn.o_proj.weight", "feed_forward.experts.down_proj",
                     "feed_forward.shared_expert.down_proj.weight"]],
    "deepseek_v3": [["self_attn.o_proj.weight", "mlp.down_proj.weight"],
                    ["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight",
                     "mlp.shared_experts.down_proj.weight"]],
    "ernie4_5_moe": [["self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"],
                     ["self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.experts.*.down_proj.weight",
                      "mlp.shared_experts.down_proj.weight", "mlp.shared_experts.down_proj.bias"]],
    "qwen3_next": [["linear_attn.out_proj.weight", "mlp.down_proj.weight"],
                   ["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight", "mlp.shared_expert.down_proj.weight"]],
    "qwen3_5_moe_text": [["linear_attn.out_proj.weight", "mlp.experts.*.down_proj.weight",
                          "mlp.shared_expert.down_proj.weight"],
                         ["self_attn.o_proj.weight", "mlp.experts.*.down_proj.weight",
                          "mlp.shared_expert.down_proj.weight"]],
    "granitemoehybrid": [["mamba.out_proj.weight", "block_sparse_moe.output_linear.weight",
                          "shared_mlp.output_linear.weight"],
                         ["self_attn.o_proj.weight", "block_sparse_moe.output_linear.weight",
                          "shared_mlp.output_linear.weight"]],
    "jamba": [["mamba.out_proj.weight", "feed_forward.down_proj.weight"],
              ["self_attn.o_proj.weight", "feed_forward.experts.*.down_proj.weight"]],
    "bamba": [["mamba.out_proj.weight", "feed_forward.down_proj.weight"],
              ["self_attn.o_proj.weight", "feed_forward.down_proj.weight"]],
    "lfm2_moe": [["conv.out_proj.weight", "feed_forward.w2.weight"],
                 ["self_attn.out_proj.weight", "feed_forward.experts.*.w2.weight"]],
    "gemma4_text": [["self_attn.o_proj.weight", "mlp.down_proj.weight", "per_layer_projection.weight"]] * 2,
    "gemma4_text-moe": [["self_attn.o_proj.weight", "mlp.down_proj.weight", "experts.down_proj"]] * 2,
}

# Families that save_pretrained (like the Hub) stores one tensor per expert, while transformers fuses them in memory.
PER_EXPERT = ["mixtral", "phimoe", "jamba", "flex_olmo", "hunyuan_v1_moe", "qwen2_moe", "qwen3_moe", "deepseek_v3",
              "glm4_moe", "ernie4_5_moe", "qwen3_next", "qwen3_5_moe_text", "lfm2_moe"]
_PER_EXPERT_NAME = re.compile(r"(.+)\.(?:block_sparse_moe|mlp|feed_forward)\.experts\.(\d+)\.(?:down_proj|w2)\.weight")


def apply(source: Path, direction: torch.Tensor, out_dir: Path) -> dict[str, torch.Tensor]:
    """Run abliterate's apply on a checkpoint folder and return the output's tensors."""
    direction_file = out_dir.parent / f"{out_dir.name}-direction.json"
    direction_file.write_text(json.dumps({"direction": direction.tolist()}))
    apply_direction(str(source), direction_file, out_dir, load_config())
    return read_tensors(out_dir)


def disk_plan(folder: Path) -> architectures.EditPlan:
    infos = {name: TensorInfo(tuple(t.shape), str(t.dtype)) for name, t in read_tensors(folder).items()}
    return plan_edits(json.loads((folder / "config.json").read_text()), infos)


def random_direction(d_model: int, seed: int = 1) -> torch.Tensor:
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))  # [d_model]
    return direction / direction.norm()


def save_fused(model: torch.nn.Module, folder: Path) -> Path:
    """The in-memory (fused-expert) state dict written as a checkpoint, as some Hub repositories store it."""
    folder.mkdir(parents=True)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    return folder


def max_residual_cosine(model: torch.nn.Module, run: torch.nn.Module, direction: torch.Tensor) -> float:
    """Largest |h.r|/|h| over every layer input and the final norm's input, on a left-padded batch."""
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))  # [batch, pos]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad(), capture_layer_inputs(model) as captured:
        run(input_ids=ids, attention_mask=mask)
    assert len(captured) >= 3
    real = [hidden[mask.bool()] for hidden in captured.values()]  # each [tokens, d_model]
    return max(((h @ direction).abs() / h.norm(dim=-1)).max().item() for h in real)


@pytest.fixture(autouse=True)
def quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.mark.parametrize("name", sorted(EXPECTED_WRITERS))
def test_plan_names_exactly_each_layers_writers(name: str, tmp_path: Path) -> None:
    folder = save_tiny(build_tiny(name), tmp_path / name)
    plan = disk_plan(folder)
    assert [edit for edit in plan.edits if plan.edits[edit].layer is None] == [f"{plan.prefix}embed_tokens.weight"]
    for layer, expected in enumerate(EXPECTED_WRITERS[name]):
        names = [rel.replace(E, str(e)) for rel in expected for e in (range(4) if E in rel else [0])]
        wanted = sorted(f"{plan.layers_prefix}{layer}.{rel}" for rel in names)
        assert sorted(plan.per_layer[layer]) == wanted, f"{name} layer {layer}"


@pytest.mark.parametrize("name", PER_EXPERT)
def test_per_expert_and_fused_layouts_get_the_same_edit(name: str, tmp_path: Path) -> None:
    model = build_tiny(name)
    per_expert, fused = save_tiny(model, tmp_path / "per_expert"), save_fused(model, tmp_path / "fused")
    direction = random_direction(model.config.hidden_size)
    edited_split = apply(per_expert, direction, tmp_path / "edited_per_expert")
    edited_fused = apply(fused, direction, tmp_path / "edited_fused")
    experts = {}  # fused name -> {expert index: edited per-expert down projection [d_model, inter]}
    for tensor_name, tensor in edited_split.items():
        found = _PER_EXPERT_NAME.fullmatch(tensor_name)
        if found:
            block = "feed_forward" if ".feed_forward." in tensor_name else "mlp"
            experts.setdefault(f"{found.group(1)}.{block}.experts.down_proj", {})[int(found.group(2))] = tensor
    assert experts, "save_pretrained no longer writes one tensor per expert: this test lost its subject"
    fused_plan = disk_plan(fused)
    for fused_name, by_index in experts.items():
        stacked = torch.stack([by_index[i] for i in sorted(by_index)])  # [experts, d_model, inter]
        assert torch.allclose(edited_fused[fused_name], stacked, rtol=0, atol=1e-7), fused_name
        if not fused_plan.edits[fused_name].needs:  # behind a post-norm the experts are orthogonal to g * r instead
            assert (torch.einsum("edi,d->ei", edited_fused[fused_name], direction).abs().max() < 1e-6)
    # Both edited checkpoints load into the same model.
    logits = [AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.arange(3, 9)[None]).logits
              for folder in (tmp_path / "edited_per_expert", tmp_path / "edited_fused")]
    assert torch.allclose(logits[0], logits[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, experts", [("gpt_oss", "mlp.experts"), ("llama4_text", "feed_forward.experts")])
def test_square_inter_d_model_experts_are_edited_along_d_model(name: str, experts: str, tmp_path: Path) -> None:
    model = build_tiny(name)
    folder = save_tiny(model, tmp_path / "source")
    plan = disk_plan(folder)
    layer = len(EXPECTED_WRITERS[name]) - 1  # the last layer is an MoE layer in both tiny models
    down_name = f"{plan.layers_prefix}{layer}.{experts}.down_proj"
    original = read_tensors(folder)[down_name]
    assert original.shape[1] == original.shape[2] == plan.d_model  # square: the shape cannot tell the orientation
    assert plan.edits[down_name].axis == 2
    direction = random_direction(plan.d_model)
    edited = apply(folder, direction, tmp_path / "edited")[down_name]  # [experts, inter, d_model]
    # The expert computes h @ down_proj[e]: its output is orthogonal to r exactly when down_proj[e] @ r = 0.
    assert (edited @ direction).abs().max() < 1e-6
    assert (direction @ edited).abs().max() > 1e-2  # the other axis still carries r: orientation mattered
    if name == "gpt_oss":
        bias = read_tensors(tmp_path / "edited")[f"{down_name}_bias"]  # [experts, d_model]
        assert (bias @ direction).abs().max() < 1e-6


def test_gemma4_nested_post_norms_need_both_gains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny("gemma4_text-moe")
    folder = save_tiny(model, tmp_path / "source")
    plan = disk_plan(folder)
    layer0 = f"{plan.layers_prefix}0."
    outer = f"{layer0}post_feedforward_layernorm.weight"
    assert plan.edits[f"{layer0}mlp.down_proj.weight"].needs == (f"{layer0}post_feedforward_layernorm_1.weight", outer)
    assert plan.edits[f"{layer0}experts.down_proj"].needs == (f"{layer0}post_feedforward_layernorm_2.weight", outer)
    direction = random_direction(plan.d_model)
    apply(folder, direction, tmp_path / "exact")
    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "exact", dtype=torch.float32)
    assert max_residual_cosine(exact, exact, direction) < 1e-5

    # Control: the same table with only the outer norm's gain behind the MLP and the experts leaves r in the stream.
    entry = architectures.ARCHITECTURES["gemma4_text"]
    outer_only = tuple(dataclasses.replace(rule, post_norms=rule.post_norms[-1:]) if len(rule.post_norms) == 2
                       else rule for rule in entry.writers)
    assert outer_only != entry.writers  # the control really drops the inner gains
    monkeypatch.setitem(architectures.ARCHITECTURES, "gemma4_text", dataclasses.replace(entry, writers=outer_only))
    apply(folder, direction, tmp_path / "outer_only")
    wrong = AutoModelForCausalLM.from_pretrained(tmp_path / "outer_only", dtype=torch.float32)
    assert max_residual_cosine(wrong, wrong, direction) > 1e-3


@torch.no_grad()
def test_llama4_multimodal_edits_only_its_language_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = Llama4ForConditionalGeneration._from_config(llama4_multimodal_config(), dtype=torch.float32).eval()
    for parameter in original.parameters():
        parameter.normal_(0.0, 0.1)
    folder = save_tiny(original, tmp_path / "source")
    plan = disk_plan(folder)
    assert plan.prefix == "language_model.model." and plan.untie is None
    direction = random_direction(plan.d_model)
    before, after = read_tensors(folder), apply(folder, direction, tmp_path / "edited")
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) == (name not in plan.edits), name
    assert any(name.startswith("vision_model.") for name in before)  # the vision tower was there, and is unchanged
    edited = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    assert max_residual_cosine(edited, edited.language_model, direction) < 1e-5
    ids = torch.arange(3, 11)[None]  # [batch, pos]
    with ablate_direction(original, direction):
        hooked = original.language_model(input_ids=ids).logits
    assert torch.allclose(edited.language_model(input_ids=ids).logits, hooked, rtol=0, atol=1e-4 * hooked.abs().max())
    generated = edited.language_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_gpt_oss_mxfp4_checkpoint_is_refused() -> None:
    config = {"model_type": "gpt_oss", "num_hidden_layers": 1, "hidden_size": 32}
    tensors = {"model.embed_tokens.weight": TensorInfo((128, 32), "BF16"),
               "model.layers.0.self_attn.o_proj.weight": TensorInfo((32, 32), "BF16"),
               "model.layers.0.mlp.experts.down_proj_blocks": TensorInfo((4, 32, 1, 16), "U8"),
               "model.layers.0.mlp.experts.down_proj_scales": TensorInfo((4, 32, 1), "U8")}
    with pytest.raises(UserError, match=r"down_proj_blocks is quantized; .* Use a dequantized \(e\.g\. BF16\) copy"):
        plan_edits(config, tensors)
    # Without the telltale names, a layer left with no float MLP writer is still refused, never half-edited.
    del tensors["model.layers.0.mlp.experts.down_proj_blocks"], tensors["model.layers.0.mlp.experts.down_proj_scales"]
    with pytest.raises(UserError, match="Layer 0 of this gpt_oss checkpoint has no mlp residual writer"):
        plan_edits(config, tensors)


@torch.no_grad()
def test_qwen3_vl_moe_experts_in_either_orientation_get_the_same_edit(tmp_path: Path) -> None:
    model = build_tiny("qwen3_vl_moe")
    saved = save_tiny(model, tmp_path / "transformers5")  # fused [experts, d_model, inter]
    tensors = read_tensors(saved)
    down_names = [name for name in tensors if name.endswith("mlp.experts.down_proj")]
    assert down_names and all(tensors[name].shape[1] == model.config.text_config.hidden_size for name in down_names)
    # The Hub's layout (written by transformers 4): the same experts as [experts, inter, d_model], gate_up likewise.
    hub = tmp_path / "hub"
    hub.mkdir()
    transposed = {name: (tensor.transpose(1, 2).contiguous() if ".mlp.experts." in name else tensor)
                  for name, tensor in tensors.items()}
    save_file(transposed, hub / "model.safetensors", metadata={"format": "pt"})
    (hub / "config.json").write_text((saved / "config.json").read_text())
    direction = random_direction(model.config.text_config.hidden_size)
    edited = apply(saved, direction, tmp_path / "edited5")
    edited_hub = apply(hub, direction, tmp_path / "edited_hub")
    for name in down_names:
        assert torch.equal(edited_hub[name].transpose(1, 2), edited[name])
        assert (torch.einsum("edi,d->ei", edited[name], direction).abs().max() < 1e-6)
    ids = torch.arange(3, 9)[None]  # [batch, pos]
    logits = [type(model).from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
              for folder in (tmp_path / "edited5", tmp_path / "edited_hub")]
    assert torch.allclose(logits[0], logits[1], rtol=0, atol=1e-5)


def test_square_experts_of_a_two_orientation_family_are_refused() -> None:
    config = {"model_type": "qwen3_vl_moe", "text_config": {"num_hidden_layers": 1, "hidden_size": 32}}
    tensors = {"model.language_model.embed_tokens.weight": TensorInfo((128, 32), "BF16"),
               "model.language_model.layers.0.self_attn.o_proj.weight": TensorInfo((32, 32), "BF16"),
               "model.language_model.layers.0.mlp.experts.down_proj": TensorInfo((4, 32, 32), "BF16")}
    with pytest.raises(UserError, match=r"cannot tell which axis is d_model=32 .*refusing to guess"):
        plan_edits(config, tensors)


def test_minimax_normalized_residual_is_refused() -> None:
    with pytest.raises(UserError, match="re-normalized inside every layer"):
        plan_edits({"model_type": "minimax", "num_hidden_layers": 1, "hidden_size": 32}, {})


def test_llava_wrapper_takes_writers_and_norms_from_its_language_model(tmp_path: Path) -> None:
    plan = disk_plan(save_tiny(build_tiny("llava-gemma2"), tmp_path / "llava"))
    assert plan.arch == "llava[gemma2]" and plan.prefix == "language_model.model."
    o_proj = plan.edits[f"{plan.layers_prefix}0.self_attn.o_proj.weight"]
    assert o_proj.needs == (f"{plan.layers_prefix}0.post_attention_layernorm.weight",)
    assert o_proj.gain == "one_plus_weight"  # Gemma 2's convention, from its own entry
    assert not any(name.startswith("vision_tower.") for name in plan.edits)
    with pytest.raises(UserError, match="Unsupported model_type 'mamba'"):
        plan_edits({"model_type": "llava", "text_config": {"model_type": "mamba"}}, {})


@torch.no_grad()
def test_deepseek_multi_token_prediction_layer_is_copied_not_edited(tmp_path: Path) -> None:
    # DeepSeek V3 / GLM-4.5 Hub checkpoints carry an MTP layer at index num_hidden_layers, which transformers does
    # not load; it has its own embedding, head and projections, none of them part of the residual stream we edit.
    model = build_tiny("deepseek_v3")
    folder = save_tiny(model, tmp_path / "source")
    n_layers = model.config.num_hidden_layers
    tensors = read_tensors(folder)
    mtp = {name.replace(f"layers.{n_layers - 1}.", f"layers.{n_layers}."): tensor.clone()
           for name, tensor in tensors.items() if f"layers.{n_layers - 1}." in name}
    mtp.update({f"model.layers.{n_layers}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                f"model.layers.{n_layers}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
                f"model.layers.{n_layers}.eh_proj.weight": torch.randn(32, 64)})
    for path in folder.glob("*.safetensors"):
        path.unlink()
    save_file({**tensors, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    plan = disk_plan(folder)
    assert any(f"layer {n_layers} is beyond" in line for line in plan.describe())
    direction = random_direction(plan.d_model)
    after = apply(folder, direction, tmp_path / "edited")
    assert all(torch.equal(after[name], tensor) for name, tensor in mtp.items())
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    assert max_residual_cosine(edited, edited, direction) < 1e-5
