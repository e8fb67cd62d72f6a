"""The strict config: unknown keys are errors with a suggestion, types are checked, default.toml mirrors the fields."""

from pathlib import Path

import pytest

from abliterate.config import load_config, render_default_toml
from abliterate.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_default_toml_mirrors_every_field():
    assert (ROOT / "configs" / "default.toml").read_text() == render_default_toml()


def test_default_toml_loads_to_defaults():
    assert load_config(ROOT / "configs" / "default.toml") == load_config()


def test_every_preset_loads():
    for preset in (ROOT / "configs").glob("*.toml"):
        load_config(preset)


def test_unknown_key_names_the_nearest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[measure]\nkl_mx = 0.2\n")
    with pytest.raises(UserError, match="measure.kl_mx.*kl_max"):
        load_config(path)


def test_unknown_section(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[mesure]\nkl_max = 0.2\n")
    with pytest.raises(UserError, match="mesure.*measure"):
        load_config(path)


def test_wrong_type_and_cross_field_checks(tmp_path):
    with pytest.raises(UserError, match="must be of type int"):
        load_config(overrides={"prompts": {"n_train": "many"}})
    with pytest.raises(UserError, match="direction_file"):
        load_config(overrides={"measure": {"use_reference": True}})
    with pytest.raises(UserError, match=r"optimize.refine_share must be in \[0, 1\], not 1.5"):
        load_config(overrides={"optimize": {"refine_share": 1.5}})
    with pytest.raises(UserError, match="measure.batch_size must be at least 1, got 0"):
        load_config(overrides={"measure": {"batch_size": 0}})
    with pytest.raises(UserError, match="measure.kl_max must be above 0"):
        load_config(overrides={"measure": {"kl_max": -1}})
    with pytest.raises(UserError, match="model.device_map must be .* got 'gpu0'; fix --device-map"):
        load_config(overrides={"model": {"device_map": "gpu0"}})
    for rejected in ("0", "disk"):  # transformers refuses both as a device_map string
        with pytest.raises(UserError, match="model.device_map must be"):
            load_config(overrides={"model": {"device_map": rejected}})
    for accepted in ("auto", "cpu", "cuda:1", "sequential", "none"):
        assert load_config(overrides={"model": {"device_map": accepted}}).model.device_map == accepted
    path = tmp_path / "bad.toml"
    path.write_text("[measure\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(path)


def test_ints_accepted_for_floats():
    assert load_config(overrides={"measure": {"kl_max": 1}}).measure.kl_max == 1.0
