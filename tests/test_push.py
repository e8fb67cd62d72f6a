"""`abliterate push` against a loopback Hub (tests/hub_server.py): what arrives is exactly the local folder.

The client is the real huggingface_hub 2.4 talking HTTP to 127.0.0.1; only Xet is switched off (the fake Hub
speaks the plain LFS batch protocol) and offline mode is lifted for the duration of each test.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from safetensors.torch import save_file
from typer.testing import CliRunner

from abliterate import __version__
from abliterate.cli import app
from abliterate.errors import UserError
from abliterate.hub import check_output_complete, push

TOKEN = "hf_test_write_token_0123456789"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server = FakeHub(TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def _finished_output(root: Path) -> Path:
    """A folder shaped like a finished run: two shards plus index, config, tokenizer, card and provenance."""
    out = root / "out"
    out.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(8, 4, generator=generator)},
              str(out / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.weight": torch.randn(8, 4, generator=generator), "model.norm.weight": torch.ones(4)},
              str(out / "model-00002-of-00002.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out / "tokenizer_config.json").write_text("{}")
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    (out / "README.md").write_text("---\ntags:\n- abliterated\n---\n# card\n")
    (out / "abliterate").mkdir()
    (out / "abliterate" / "run.json").write_text('{"seed": 42}')
    # The pipeline's own copy of the checkpoint (hard links in a real run) must stay local.
    (out / "abliterate" / "apply" / "checkpoint").mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(out / "abliterate" / "apply" / "checkpoint" / "model.safetensors"))
    return out


def _local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and "apply" not in p.parts}


def test_push_uploads_every_file_byte_for_byte(hub: FakeHub, tmp_path: Path):
    out = _finished_output(tmp_path)
    url = push(out, "alice/tiny-abliterated", token=TOKEN)
    assert hub.files("alice/tiny-abliterated") == _local_files(out)
    assert not hub.repos["alice/tiny-abliterated"].private
    # Weights travel through LFS (one PUT per shard), the small files inside the commit.
    assert len(hub.lfs_puts) == 2
    (branch, summary), = hub.repos["alice/tiny-abliterated"].commits
    assert branch == "main" and summary == f"Upload abliterated model with abliterate {__version__}"
    assert url.startswith(f"{hub.url}/alice/tiny-abliterated/commit/")


def test_private_branch_and_rerun_after_a_failed_commit(hub: FakeHub, tmp_path: Path):
    out = _finished_output(tmp_path)
    hub.fail_next_commit = True
    with pytest.raises(UserError, match="answered 500.*rerun `abliterate push`"):
        push(out, "alice/tiny", private=True, revision="abliterated", token=TOKEN)
    assert hub.files("alice/tiny", "abliterated") == {}
    push(out, "alice/tiny", private=True, revision="abliterated", token=TOKEN)
    assert hub.repos["alice/tiny"].private
    assert hub.files("alice/tiny", "abliterated") == _local_files(out)
    assert hub.files("alice/tiny", "main") == {}
    # The rerun found both shards already stored and sent no weight bytes again.
    assert len(hub.lfs_puts) == 2


def test_rejected_token_is_one_clear_line_without_the_token(hub: FakeHub, tmp_path: Path):
    out = _finished_output(tmp_path)
    with pytest.raises(UserError) as caught:
        push(out, "alice/tiny", token="hf_wrong_token_abcdef")
    message = str(caught.value)
    assert "refused the token (401)" in message and "write access to alice/tiny" in message
    assert "hf_wrong_token_abcdef" not in message
    assert hub.repos == {}


def test_missing_token(hub: FakeHub, tmp_path: Path):
    with pytest.raises(UserError, match="No Hugging Face token found; run `hf auth login` or set HF_TOKEN"):
        push(_finished_output(tmp_path), "alice/tiny")
    assert hub.requests == []


def test_unreachable_hub(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match="could not reach the Hub.*rerun `abliterate push`"):
        push(_finished_output(tmp_path), "alice/tiny", token=TOKEN)


def _drop_shard(out: Path) -> None:
    (out / "model-00002-of-00002.safetensors").unlink()


def _stray_shard(out: Path) -> None:
    save_file({"y": torch.zeros(1)}, str(out / "model-00003-of-00003.safetensors"))


def _wrong_tensors(out: Path) -> None:
    save_file({"other": torch.zeros(1)}, str(out / "model-00002-of-00002.safetensors"))


def _leftover(out: Path) -> None:
    (out / "model-00001-of-00002.safetensors.tmp").write_bytes(b"half")


def _no_tokenizer(out: Path) -> None:
    (out / "tokenizer.json").unlink()


def _no_config(out: Path) -> None:
    (out / "config.json").unlink()


@pytest.mark.parametrize("damage, message", [
    (_drop_shard, "index names shards that are missing \\(model-00002-of-00002.safetensors\\)"),
    (_stray_shard, "holds shards the index does not name \\(model-00003-of-00003.safetensors\\)"),
    (_wrong_tensors, "does not hold the tensors its index lists"),
    (_leftover, "holds an unfinished write \\(model-00001-of-00002.safetensors.tmp\\)"),
    (_no_tokenizer, "has no tokenizer"),
    (_no_config, "has no config.json"),
])
def test_incomplete_folder_is_refused_before_any_request(hub: FakeHub, tmp_path: Path, damage, message):
    out = _finished_output(tmp_path)
    damage(out)
    with pytest.raises(UserError, match=message):
        push(out, "alice/tiny", token=TOKEN)
    assert hub.requests == []


def test_check_lists_the_files_to_upload(tmp_path: Path):
    out = _finished_output(tmp_path)
    names = {p.relative_to(out).as_posix() for p in check_output_complete(out)}
    assert {"config.json", "model.safetensors.index.json", "README.md", "abliterate/run.json"} <= names


def test_cli_push(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = _finished_output(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["push", str(out), "--repo", "bob/model", "--revision", "v1", "--private"])
    assert result.exit_code == 0, result.output
    assert "bob/model/commit/" in result.output and TOKEN not in result.output
    assert hub.files("bob/model", "v1") == _local_files(out)
    result = CliRunner().invoke(app, ["push", str(out), "--repo", "not-a-repo"])
    assert result.exit_code != 0 and "--repo must be owner/name" in str(result.exception)


def _truncated_shard(out: Path) -> None:
    path = out / "model-00002-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-24])  # the header is whole; the last tensor's bytes are not


def _direction_beside_the_weights(out: Path) -> None:
    save_file({"direction": torch.ones(4)}, str(out / "direction.safetensors"))  # where old versions put it


@pytest.mark.parametrize("damage, message", [
    (_truncated_shard, ("model-00002-of-00002.safetensors in .* is truncated or corrupt \\(tensor .* lies outside "
                        "the file\\); rerun the job that wrote the folder")),
    (_direction_beside_the_weights, ("has direction.safetensors beside the weights.*move it and direction.json "
                                     "into .*abliterate, then push")),
])
def test_damaged_weights_are_refused_from_their_headers_before_any_request(hub: FakeHub, tmp_path: Path, damage,
                                                                           message):
    out = _finished_output(tmp_path)
    damage(out)
    with pytest.raises(UserError, match=message):
        push(out, "alice/tiny", token=TOKEN)
    assert hub.requests == []
