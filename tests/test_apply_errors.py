"""Every bad input to `apply` gives its own message and leaves nothing behind: no output, no temporary directory."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from apply_models import D_MODEL, save_checkpoint, tiny_llama

from abliterate import apply as checkpoint
from abliterate.apply import apply_direction, inspect_checkpoint
from abliterate.config import load_config
from abliterate.direction import save_direction
from abliterate.errors import UserError
from abliterate.hub import resolve_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_checkpoint(tiny_llama(torch.float32, n_layers=1), tmp_path_factory.mktemp("llama1"))


@pytest.fixture(scope="module")
def good_direction(tmp_path_factory):
    return save_direction(tmp_path_factory.mktemp("dir"), torch.randn(D_MODEL), {})


@pytest.fixture
def parent(tmp_path):
    """An empty folder to write `out` into; after a refused apply it must still be empty."""
    folder = tmp_path / "parent"
    folder.mkdir()
    return folder


def _refused(source, direction, out, force=False) -> str:
    with pytest.raises(UserError) as info:
        apply_direction(str(source), direction, out, load_config(), force=force)
    return str(info.value)


def _direction(tmp_path, name: str, write) -> object:
    path = tmp_path / name
    write(path)
    return path


BAD_DIRECTIONS = {
    "wrong length": ("d.json", lambda p: p.write_text(json.dumps({"direction": [0.5] * (D_MODEL + 1)})),
                     f"has {D_MODEL + 1} values but the model's hidden size (d_model) is {D_MODEL}"),
    "nan": ("d.pt", lambda p: torch.save(torch.tensor([float("nan")] * D_MODEL), p), "NaN or infinite"),
    "zero": ("d.npy", lambda p: np.save(p, np.zeros(D_MODEL)), "is the zero vector"),
    "malformed": ("d.json", lambda p: p.write_text("{oops"), "is malformed (not valid JSON"),
    "unknown extension": ("d.csv", lambda p: p.write_text("1,2"), "unknown extension '.csv'"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRECTIONS))
def test_bad_direction(model_dir, parent, tmp_path, case):
    name, write, expected = BAD_DIRECTIONS[case]
    message = _refused(model_dir, _direction(tmp_path, name, write), parent / "out")
    assert expected in message and "--direction" in message
    assert list(parent.iterdir()) == []


def test_missing_model_dir(parent, good_direction, tmp_path):
    message = _refused(tmp_path / "no_such_model", good_direction, parent / "out")
    assert message == (f"Model directory {tmp_path / 'no_such_model'} does not exist; pass an existing directory or "
                       "a Hub id such as owner/name.")
    assert list(parent.iterdir()) == []


def test_not_a_model_dir(parent, good_direction, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "is not a model directory (no config.json)" in _refused(tmp_path / "empty", good_direction, parent / "out")


def test_bin_only_checkpoint(model_dir, parent, good_direction, tmp_path):
    source = tmp_path / "bin_only"
    source.mkdir()
    shutil.copy(model_dir / "config.json", source)
    (source / "pytorch_model.bin").write_bytes(b"pickle bytes")
    message = _refused(source, good_direction, parent / "out")
    assert "only has pickle weights (pytorch_model.bin)" in message and "safetensors" in message
    assert list(parent.iterdir()) == []


def test_unknown_architecture(model_dir, parent, good_direction, tmp_path):
    source = tmp_path / "mystery"
    shutil.copytree(model_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "mystery"}))
    message = _refused(source, good_direction, parent / "out")
    assert message.startswith("Unsupported model_type 'mystery' in config.json") and "llama" in message
    assert list(parent.iterdir()) == []


def test_non_empty_out_refused_without_force(model_dir, parent, good_direction):
    out = parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = _refused(model_dir, good_direction, out)
    assert message == f"--out {out} is not empty; pass --force to replace it or choose another --out."
    assert sorted(p.name for p in parent.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_never_writes_into_or_over_the_input(model_dir, good_direction):
    before = sorted(p.name for p in model_dir.iterdir())
    assert "abliterate never writes into its input" in _refused(model_dir, good_direction, model_dir, force=True)
    assert "abliterate never writes into its input" in _refused(model_dir, good_direction, model_dir / "sub")
    assert "contains the input model" in _refused(model_dir, good_direction, model_dir.parent, force=True)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_missing_shard_named_by_index(model_dir, parent, good_direction, tmp_path):
    source = tmp_path / "broken"
    shutil.copytree(model_dir, source)
    (source / "model.safetensors").rename(source / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing shards named in its index: model-00002-of-00002.safetensors" in \
        _refused(source, good_direction, parent / "out")


def test_failure_midway_leaves_nothing_and_keeps_old_output(model_dir, parent, good_direction, monkeypatch):
    """A crash while writing removes the temporary directory and leaves an existing --out untouched."""
    out = parent / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous run")
    calls = []

    def failing_edit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return args[1].clone()

    monkeypatch.setattr(checkpoint, "edit_tensor", failing_edit)
    with pytest.raises(RuntimeError, match="disk full"):
        apply_direction(str(model_dir), good_direction, out, load_config(), force=True)
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]


def test_a_full_disk_is_refused_before_any_data_is_written(model_dir, parent, good_direction, monkeypatch):
    out = parent / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous run")

    def full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    message = _refused(model_dir, good_direction, out, force=True)
    assert message.startswith(f"Not enough free disk space in {parent} for the output (")
    assert message.endswith("free some space there or choose another --out.")
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]


def test_a_file_system_that_cannot_preallocate_still_gets_the_same_bytes(model_dir, good_direction, tmp_path,
                                                                         monkeypatch):
    reference = apply_direction(str(model_dir), good_direction, tmp_path / "reference", load_config())

    def unsupported(descriptor, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    apply_direction(str(model_dir), good_direction, tmp_path / "out", load_config())
    for shard in reference["shards"]:
        assert (tmp_path / "out" / shard).read_bytes() == (tmp_path / "reference" / shard).read_bytes()


def test_an_output_that_cannot_be_mapped_is_written_the_same(model_dir, good_direction, tmp_path, monkeypatch):
    from abliterate import shards

    reference = apply_direction(str(model_dir), good_direction, tmp_path / "reference", load_config())

    def unmappable(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(shards.mmap, "mmap", unmappable)
    apply_direction(str(model_dir), good_direction, tmp_path / "out", load_config())
    for shard in reference["shards"]:
        assert (tmp_path / "out" / shard).read_bytes() == (tmp_path / "reference" / shard).read_bytes()


def test_truncated_shard(model_dir, parent, good_direction, tmp_path):
    source = tmp_path / "truncated"
    shutil.copytree(model_dir, source)
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "is truncated or corrupt" in _refused(source, good_direction, parent / "out")
    assert list(parent.iterdir()) == []


def test_inspect_refuses_wrong_direction(model_dir, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"direction": [1.0] * 5}))
    with pytest.raises(UserError, match=f"has 5 values but the model's hidden size \\(d_model\\) is {D_MODEL}"):
        inspect_checkpoint(str(model_dir), path, load_config())


def test_resolve_model(model_dir, tmp_path):
    assert resolve_model(str(model_dir)) == model_dir
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        resolve_model(str(tmp_path / "file.txt"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model("./relative/missing")
    with pytest.raises(UserError, match=r"not in the Hub cache, and the Hub cannot be reached \(offline"):
        resolve_model("nobody-here/no-such-model-xyz", revision="main")


def test_layer_without_writer_refused_by_inspect_and_apply(model_dir, parent, good_direction, tmp_path):
    """A checkpoint whose layer 0 lost its MLP output projection is refused, never edited partially."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "no_down_proj"
    shutil.copytree(model_dir, source)
    tensors = load_file(str(source / "model.safetensors"))
    kept = {name: t for name, t in tensors.items() if not name.startswith("model.layers.0.mlp.down_proj")}
    save_file(kept, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="Layer 0 of this llama checkpoint has no mlp residual writer"):
        inspect_checkpoint(str(source), None, load_config())
    assert "Layer 0 of this llama checkpoint has no mlp residual writer" in \
        _refused(source, good_direction, parent / "out")
    assert list(parent.iterdir()) == []


def test_quantized_writer_refused_before_writing(model_dir, parent, good_direction, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "fp8"
    shutil.copytree(model_dir, source)
    tensors = load_file(str(source / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    message = _refused(source, good_direction, parent / "out")
    assert message == (f"Tensor {name} is stored as F8_E4M3; abliterate edits only float16, bfloat16 and float32 "
                       "weights. Dequantize the checkpoint first.")
    assert list(parent.iterdir()) == []


def test_corrupt_header_entry(model_dir, parent, good_direction, tmp_path):
    source = tmp_path / "corrupt"
    source.mkdir()
    shutil.copy(model_dir / "config.json", source)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2]}}).encode()  # no data_offsets
    (source / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    assert "has a corrupt header entry for x" in _refused(source, good_direction, parent / "out")


def test_inspect_hub_id_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match=r"not in the Hub cache, and the Hub cannot be reached \(offline"):
        inspect_checkpoint("nobody-here/no-such-model-xyz", None, load_config())
