"""`abliterate apply` on a tiny random Llama: the edit is exact, everything else is bit-identical, output loads.

The model is built with transformers from a config (random weights, non-zero biases, tied embeddings) and saved
once per session; each output is written once per module and checked by several tests.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from apply_models import D_MODEL, SMALL_FILES, save_checkpoint, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from abliterate import apply as checkpoint
from abliterate.apply import apply_direction, edit_in_chunks, inspect_checkpoint
from abliterate.cli import app
from abliterate.config import load_config, parse_size
from abliterate.direction import save_direction
from abliterate.errors import UserError
from abliterate.weights import edit_tensor


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_checkpoint(tiny_llama(torch.float32), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_bf16_sharded_dir(tmp_path_factory):
    return save_checkpoint(tiny_llama(torch.bfloat16), tmp_path_factory.mktemp("llama_bf16"), max_shard_size="20KB")


@pytest.fixture(scope="session")
def direction_file(tmp_path_factory):
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    return save_direction(tmp_path_factory.mktemp("direction"), vector, {"layer": 1, "position": -1})


@pytest.fixture(scope="module")
def applied(llama_dir, direction_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("applied") / "out"
    record = apply_direction(str(llama_dir), direction_file, out, load_config())
    return out, record


def _unit(direction_file) -> torch.Tensor:
    return load_file(str(direction_file.with_suffix(".safetensors")))["direction"]


def _ablation_hooks(model, r: torch.Tensor) -> list:
    """The paper's inference-time ablation: remove r from the embedding and every sublayer output."""
    def hook(module, inputs, output):
        return output - (output @ r).unsqueeze(-1) * r

    modules = [model.model.embed_tokens] + [m for layer in model.model.layers
                                            for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    return [module.register_forward_hook(hook) for module in modules]


INPUT_IDS = torch.tensor([[0, 0, 5, 17, 33, 2], [4, 9, 61, 8, 13, 70]])
ATTENTION = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, as chat batches are


def test_output_files(applied, llama_dir):
    out, _ = applied
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["model.safetensors", "config.json", "generation_config.json", "abliteration.json",
                            "abliterate", *SMALL_FILES])
    # The direction lives with the provenance: runtimes that load every *.safetensors at the top (vLLM without an
    # index) meet only the weights.
    assert sorted(p.name for p in (out / "abliterate").iterdir()) == ["direction.json", "direction.safetensors"]
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    for name in [*SMALL_FILES, "generation_config.json"]:
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    original = json.loads((llama_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "tie_word_embeddings"} == \
        {k: v for k, v in original.items() if k != "tie_word_embeddings"}
    assert not list(out.parent.glob(".*abliterate-tmp*"))
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not the private 0700 of a temporary directory


def test_non_writers_bit_identical_and_lm_head_is_original_embedding(applied, llama_dir):
    out, record = applied
    before = load_file(str(llama_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    edited = {entry["name"] for entry in record["edited_tensors"]}
    expected_edits = {"model.embed_tokens.weight"} | {f"model.layers.{i}.{m}.{p}" for i in range(2)
                                                      for m in ("self_attn.o_proj", "mlp.down_proj")
                                                      for p in ("weight", "bias")}
    assert edited == expected_edits
    assert set(after) == set(before) | {"lm_head.weight"}
    for name, tensor in before.items():
        if name not in edited:
            assert tensor.dtype == after[name].dtype and torch.equal(tensor, after[name]), name
        else:
            assert not torch.equal(tensor, after[name]), name
    assert torch.equal(after["lm_head.weight"], before["model.embed_tokens.weight"])


def test_edited_logits_equal_hooked_ablation_and_residual_is_clean(applied, llama_dir, direction_file):
    out, _ = applied
    r = _unit(direction_file)
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    handles = _ablation_hooks(original, r)
    with torch.no_grad():
        reference = original(INPUT_IDS, attention_mask=ATTENTION).logits
        result = edited(INPUT_IDS, attention_mask=ATTENTION, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    assert torch.allclose(result.logits, reference, atol=1e-5, rtol=0)
    # Every layer input (hidden_states[:-1]; the last entry is after the final norm) has no component along r.
    for hidden in result.hidden_states[:-1]:
        ratio = (hidden @ r).abs() / hidden.norm(dim=-1)  # [batch, pos]
        assert float(ratio[ATTENTION.bool()].max()) < 1e-5


def test_output_generates_like_the_hooked_original(applied, llama_dir, direction_file):
    out, _ = applied
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    handles = _ablation_hooks(original, _unit(direction_file))
    kwargs = {"attention_mask": ATTENTION, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = original.generate(INPUT_IDS, **kwargs)
        generated = edited.generate(INPUT_IDS, **kwargs)
    for handle in handles:
        handle.remove()
    assert generated.shape == (2, INPUT_IDS.shape[1] + 6)
    assert torch.equal(generated, expected)


def test_record_and_shard_provenance(applied, direction_file, llama_dir):
    out, record = applied
    # Outputs get published: the record names local inputs by their folder/file name only, never a full path.
    assert record["source"] == llama_dir.name and record["direction"]["file"] == "direction.json"
    assert str(llama_dir.parent) not in (out / "abliteration.json").read_text()
    assert json.loads((out / "abliteration.json").read_text()) == record
    assert record["architecture"] == "llama" and record["n_layers"] == 2 and record["d_model"] == D_MODEL
    assert record["edits_per_layer"] == {"0": 4, "1": 4}
    assert record["untied"] == {"embedding": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
    assert record["n_edited"] == 9 and record["n_copied"] == len(load_file(str(out / "model.safetensors"))) - 9
    sha = load_direction_sha(direction_file)
    assert record["direction"]["sha256"] == sha and record["direction"]["layer"] == 1
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["abliterate"])["direction_sha256"] == sha
    assert torch.equal(load_file(str(out / "abliterate" / "direction.safetensors"))["direction"], _unit(direction_file))
    assert record["direction"]["saved_as"] == ["abliterate/direction.json", "abliterate/direction.safetensors"]


def load_direction_sha(path) -> str:
    from abliterate.direction import load_direction

    return load_direction(path).sha256()


def test_multi_shard_bf16(llama_bf16_sharded_dir, direction_file, tmp_path):
    """Sharded bf16 input and several output shards give the same bytes as one output shard."""
    source = llama_bf16_sharded_dir
    assert (source / "model.safetensors.index.json").is_file()
    whole = apply_direction(str(source), direction_file, tmp_path / "whole", load_config())
    config = load_config(overrides={"apply": {"max_shard_size": "16KB"}})
    record = apply_direction(str(source), direction_file, tmp_path / "sharded", config)
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(record["shards"]) > 2 and whole["shards"] == ["model.safetensors"]
    assert sorted(set(index["weight_map"].values())) == sorted(record["shards"])
    total = 0
    for shard in record["shards"]:
        with safe_open(str(out / shard), framework="pt") as handle:
            names = set(handle.keys())
            assert handle.metadata()["format"] == "pt"
            sizes = [handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names]
        assert names == {n for n, f in index["weight_map"].items() if f == shard}
        assert sum(sizes) <= 16_000 or len(names) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    one = load_file(str(tmp_path / "whole" / "model.safetensors"))
    many = {n: t for shard in record["shards"] for n, t in load_file(str(out / shard)).items()}
    original = {n: t for f in set(json.loads((source / "model.safetensors.index.json").read_text())
                                  ["weight_map"].values()) for n, t in load_file(str(source / f)).items()}
    assert set(one) == set(many) == set(original) | {"lm_head.weight"}
    for name in one:
        assert one[name].dtype == torch.bfloat16 and torch.equal(one[name], many[name]), name
    assert torch.equal(many["lm_head.weight"], original["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, original["model.embed_tokens.weight"])


def test_edit_in_chunks_matches_edit_tensor(llama_dir, direction_file):
    plan = inspect_checkpoint(str(llama_dir), None, load_config())
    tensors = load_file(str(llama_dir / "model.safetensors"))
    r = _unit(direction_file)
    for name, edit in plan.edits.items():
        expected = edit_tensor(edit, tensors[name], r, {})
        in_place = tensors[name].clone()
        assert edit_in_chunks(edit, in_place, r, {}).data_ptr() == in_place.data_ptr()  # no second copy
        assert torch.equal(in_place, expected), name
        if tensors[name].dim() == 2:  # a strided view is edited slice by slice
            strided = tensors[name].T.contiguous().T  # same values, column-major
            assert not strided.is_contiguous()
            assert torch.equal(edit_in_chunks(edit, strided, r, {}, max_elements=50), expected), name


def test_force_replaces_and_inspect_plan(llama_dir, direction_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    apply_direction(str(llama_dir), direction_file, out, load_config(), force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    plan = inspect_checkpoint(str(llama_dir), direction_file, load_config())
    assert plan.arch == "llama" and plan.untie == ("model.embed_tokens.weight", "lm_head.weight")
    assert {layer: len(names) for layer, names in plan.per_layer.items()} == {0: 4, 1: 4}


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                        ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "five", "5XB", "0GB", "-1GB"])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="--max-shard-size"):
        parse_size(text)
    with pytest.raises(UserError, match="--max-shard-size"):  # at load time, before any long step runs
        load_config(overrides={"apply": {"max_shard_size": text}})


runner = CliRunner()


def test_cli_apply_and_inspect(llama_dir, direction_file, tmp_path):
    out = tmp_path / "cli_out"
    result = runner.invoke(app, ["apply", str(llama_dir), "--direction", str(direction_file), "--out", str(out),
                                 "--max-shard-size", "30KB"])
    assert result.exit_code == 0, result.output
    assert "9 tensors edited (llama)" in result.output
    assert (out / "model.safetensors.index.json").is_file()
    result = runner.invoke(app, ["inspect", str(llama_dir), "--direction", str(direction_file)])
    assert result.exit_code == 0, result.output
    for text in ("architecture: llama", "model.layers.1.mlp.down_proj.bias",
                 "lm_head.weight will be written from the ORIGINAL model.embed_tokens.weight", "total edited tensors: 9", "fits: 32 values",
                 "mlp x2, mixer x2"):
        assert text in result.output


def test_cli_error_is_one_line_exit_2(llama_dir, tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"direction": [1.0] * 7}))
    out = tmp_path / "out"
    process = subprocess.run([sys.executable, "-c", "from abliterate.cli import main; main()", "apply",
                              str(llama_dir), "--direction", str(bad), "--out", str(out)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        (f"error: Direction in {bad} has 7 values but the model's hidden size (d_model) is 32; pass a direction "
         "measured on this model with --direction.")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_only_writers_are_decoded(llama_dir, direction_file, tmp_path, monkeypatch):
    """Streaming: tensors that are copied are never loaded into memory; only the edited ones are read, once each."""
    read = []
    original_read = checkpoint.read_tensor

    def recording_read(stored, out=None):
        read.append(stored.name)
        return original_read(stored, out)

    monkeypatch.setattr(checkpoint, "read_tensor", recording_read)
    record = apply_direction(str(llama_dir), direction_file, tmp_path / "out", load_config())
    assert sorted(read) == sorted(entry["name"] for entry in record["edited_tensors"])


def test_a_sharded_output_of_the_cli_is_accepted_by_push(llama_bf16_sharded_dir, direction_file, tmp_path):
    from typer.testing import CliRunner

    from abliterate.cli import app
    from abliterate.hub import check_output_complete

    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["apply", str(llama_bf16_sharded_dir), "--direction", str(direction_file),
                                      "--out", str(out), "--max-shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
    pushed = {p.relative_to(out).as_posix() for p in check_output_complete(out)}  # push's own check, no refusal
    assert {"abliterate/direction.json", "abliterate/direction.safetensors", *shards} <= pushed
