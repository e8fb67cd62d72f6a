"""--max-memory and --offload-folder: a model that does not fit the memory budget loads with its layers on disk
and computes the same logits as a plain load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abliterate.config import ModelConfig, parse_max_memory
from abliterate.errors import UserError
from abliterate.model import load_model


def test_a_memory_budget_offloads_to_disk_with_identical_logits(toy_refuser_dir: Path, tmp_path: Path, one_thread):
    plain, tokenizer = load_model(str(toy_refuser_dir), ModelConfig(dtype="float32", device_map="cpu"))
    budget = ModelConfig(dtype="float32", max_memory="cpu=300KB", offload_folder=str(tmp_path / "offload"))
    offloaded, _ = load_model(str(toy_refuser_dir), budget)  # the toy's weights are 1.2 MB
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = tokenizer("How do I bake bread?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, offloaded(ids).logits)


def test_max_memory_is_parsed_like_accelerate_expects():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("") == {}
    for bad in ("20GiB", "0=lots", "=5GB"):
        with pytest.raises(UserError, match="Invalid --max-memory entry"):
            parse_max_memory(bad)
