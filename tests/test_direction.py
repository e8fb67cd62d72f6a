"""Direction files: every accepted format gives the same unit vector, and every bad input gives its own message."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from abliterate.direction import load_direction, save_direction
from abliterate.errors import UserError

D_MODEL = 24


@pytest.fixture
def raw():
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0


def _expected(raw: torch.Tensor) -> torch.Tensor:
    return (raw / raw.norm()).float()


def test_json_with_metadata(tmp_path, raw):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"direction": raw.tolist(), "layer": 5, "position": -2, "d_model": D_MODEL,
                                "model": "tiny"}))
    direction = load_direction(path, D_MODEL)
    assert torch.allclose(direction.vector, _expected(raw), rtol=0, atol=1e-7)
    assert direction.vector.dtype == torch.float32
    assert (direction.layer, direction.position, direction.meta["model"]) == (5, -2, "tiny")
    assert direction.meta["source_norm"] == pytest.approx(float(raw.norm()))


def test_safetensors_pt_npy_agree(tmp_path, raw):
    save_file({"direction": raw.float()}, str(tmp_path / "d.safetensors"))
    torch.save(raw.float(), tmp_path / "direction.pt")
    torch.save(raw.float(), tmp_path / "direction.pth")
    np.save(tmp_path / "d.npy", raw.float().numpy())
    vectors = [load_direction(tmp_path / name, D_MODEL).vector
               for name in ("d.safetensors", "direction.pt", "direction.pth", "d.npy")]
    for vector in vectors:
        assert torch.equal(vector, vectors[0])
    assert torch.allclose(vectors[0], _expected(raw), atol=1e-7)
    assert float(vectors[0].double().norm()) == pytest.approx(1.0, abs=1e-6)


def test_paper_code_bfloat16_pt(tmp_path, raw):
    """The reference code saves its direction in the model's dtype (often bf16): it is read and normalized."""
    torch.save(raw.to(torch.bfloat16), tmp_path / "direction.pt")
    direction = load_direction(tmp_path / "direction.pt")
    assert direction.vector.dtype == torch.float32
    assert torch.allclose(direction.vector, _expected(raw.to(torch.bfloat16).double()), atol=1e-7)


def test_save_then_load_is_exact(tmp_path, raw):
    path = save_direction(tmp_path / "out", raw, {"layer": 3, "position": -1, "model": "tiny"})
    assert path.name == "direction.json"
    from_json = load_direction(path, D_MODEL)
    from_tensors = load_direction(tmp_path / "out" / "direction.safetensors", D_MODEL)
    assert torch.equal(from_json.vector, from_tensors.vector)
    assert torch.allclose(from_json.vector, _expected(raw), atol=1e-7)
    assert (from_tensors.layer, from_tensors.position, from_tensors.meta["model"]) == (3, -1, "tiny")
    assert json.loads(path.read_text())["d_model"] == D_MODEL
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["direction.json", "direction.safetensors"]


def _error(path, d_model=D_MODEL) -> str:
    with pytest.raises(UserError) as info:
        load_direction(path, d_model)
    return str(info.value)


def test_wrong_length_names_both_sizes(tmp_path, raw):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"direction": raw.tolist()}))
    message = _error(path, d_model=32)
    assert f"has {D_MODEL} values" in message and "hidden size (d_model) is 32" in message
    assert "--direction" in message


def test_own_d_model_field_must_match(tmp_path, raw):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"direction": raw.tolist(), "d_model": 7}))
    assert "its own d_model field says 7" in _error(path, d_model=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused(tmp_path, raw, bad):
    values = raw.clone()
    values[3] = bad
    torch.save(values, tmp_path / "d.pt")
    assert "NaN or infinite" in _error(tmp_path / "d.pt")


def test_zero_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros(D_MODEL, dtype=np.float32))
    assert "is the zero vector" in _error(tmp_path / "d.npy")


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ('{"layer": 3}', 'expected a JSON object {"direction"'),
    ('[1, 2, 3]', 'expected a JSON object {"direction"'),
    ('{"direction": ["a", "b"]}', "'direction' must be a list of numbers"),
    ('{"direction": [1.0, 2.0], "layer": "five"}', "'layer' must be an integer"),
])
def test_malformed_json(tmp_path, text, why):
    path = tmp_path / "d.json"
    path.write_text(text)
    message = _error(path, d_model=None)
    assert "is malformed" in message and why in message


def test_two_dimensional_refused(tmp_path, raw):
    torch.save(raw.reshape(4, 6), tmp_path / "d.pt")
    assert "has shape [4, 6]; it must be a 1-D vector" in _error(tmp_path / "d.pt")


def test_safetensors_without_direction_tensor(tmp_path, raw):
    save_file({"refusal": raw.float()}, str(tmp_path / "d.safetensors"))
    assert "no tensor named 'direction'; it holds ['refusal']" in _error(tmp_path / "d.safetensors")
    # a model's weights given by mistake: a few of its tensor names, not thousands
    save_file({f"layer.{i}.weight": raw.float() for i in range(40)}, str(tmp_path / "model.safetensors"))
    assert "it holds ['layer.0.weight', 'layer.1.weight', 'layer.10.weight'] and 37 more);" in \
        _error(tmp_path / "model.safetensors")


def test_garbage_safetensors(tmp_path):
    (tmp_path / "d.safetensors").write_bytes(b"\x01\x02garbage")
    assert "not a safetensors file" in _error(tmp_path / "d.safetensors")


class _Payload:
    """An arbitrary pickled object: weights_only loading must refuse it rather than run its code."""


def test_pickle_with_code_refused(tmp_path):
    with open(tmp_path / "d.pt", "wb") as handle:
        pickle.dump(_Payload(), handle, protocol=2)
    assert "holds pickled Python objects besides tensors" in _error(tmp_path / "d.pt")


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_refusal_gives_no_advice_to_run_code_and_no_torch_warning(tmp_path, protocol):
    import subprocess
    import sys

    with open(tmp_path / "d.pt", "wb") as handle:
        pickle.dump(np.ones(D_MODEL), handle, protocol=protocol)  # protocol 4 makes torch warn
    message = _error(tmp_path / "d.pt")
    assert "weights_only" not in message and "trust" not in message and "Re-running" not in message
    # In a fresh process with every warning shown: nothing from torch reaches stderr.
    code = ("import warnings, sys; warnings.simplefilter('default'); from abliterate.direction import load_direction\n"
            f"try:\n    load_direction({str(tmp_path / 'd.pt')!r})\nexcept Exception as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "pickled Python objects" in done.stdout and done.stderr == ""


def test_pt_holding_a_dict_refused(tmp_path, raw):
    torch.save({"direction": raw}, tmp_path / "d.pt")
    assert "it holds a dict, not a 1-D tensor" in _error(tmp_path / "d.pt")


def test_npy_with_pickled_objects_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "is malformed" in _error(tmp_path / "d.npy")


def test_unknown_extension_and_missing_file(tmp_path, raw):
    (tmp_path / "d.txt").write_text(" ".join(map(str, raw.tolist())))
    assert "unknown extension '.txt'" in _error(tmp_path / "d.txt")
    assert "does not exist" in _error(tmp_path / "nothing.json")


def test_save_refuses_zero_vector(tmp_path):
    with pytest.raises(UserError, match="zero vector"):
        save_direction(tmp_path, torch.zeros(D_MODEL))
    assert not (tmp_path / "direction.json").exists()


def test_safetensors_files_are_byte_identical_whatever_the_metadata_order(tmp_path, raw):
    import subprocess
    import sys

    from abliterate.direction import safetensors_bytes

    meta = {f"key{i}": str(i) for i in range(12)}
    first = safetensors_bytes({"b": raw.float(), "a": raw.double()}, meta)
    again = safetensors_bytes({"a": raw.double(), "b": raw.float()}, dict(reversed(meta.items())))
    assert first == again
    loaded = load_file_with_metadata(first)
    assert loaded[1] == meta and torch.equal(loaded[0]["b"], raw.float())
    # Two processes (each with its own hash seeds) write the same direction file, byte for byte.
    code = ("import sys, torch; from abliterate.direction import save_direction\n"
            "save_direction(sys.argv[1], torch.arange(1.0, 9.0), {'layer': 3, 'position': -1, 'model': 'm', "
            "'scores': {'kl': 0.1, 'bypass': -2.0}, 'seed': 42, 'n_layers': 8})")
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, timeout=120)
    for file in ("direction.json", "direction.safetensors"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()


def load_file_with_metadata(data: bytes):
    import tempfile

    from safetensors import safe_open

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(data)
        handle.flush()
        with safe_open(handle.name, framework="pt") as reader:
            return {name: reader.get_tensor(name) for name in reader.keys()}, reader.metadata()  # noqa: SIM118
