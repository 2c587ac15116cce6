"""Code tests: params.yaml loading, profiles and error messages."""

import pytest

from mmkd.config import ConfigError, load_params
from tests.conftest import REPO


def test_repo_params_load_for_every_profile():
    default = load_params(REPO / "params.yaml")
    smoke = load_params(REPO / "params.yaml", "smoke")
    assert default.profile == "default" and smoke.profile == "smoke"
    assert smoke.synth.train_per_modality < default.synth.train_per_modality
    # an overlay changes only what it names
    assert smoke.synth.image_size == default.synth.image_size
    assert smoke.teachers.registry == default.teachers.registry


def test_bad_key_is_named(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  difficulty: 0.7", "  difficulty: 0.7\n  dificulty: 3")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"synth\.dificulty"):
        load_params(tmp_path / "p.yaml")


def test_bad_value_is_named(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("batch_size: 128", "batch_size: -3", 1)
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"pretrain\.train\.batch_size"):
        load_params(tmp_path / "p.yaml")


def test_unknown_profile_and_modality(tmp_path):
    with pytest.raises(ConfigError, match="profile 'huge'"):
        load_params(REPO / "params.yaml", "huge")
    text = (REPO / "params.yaml").read_text().replace("modalities: [pathology]", "modalities: [histo]")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match="histo"):
        load_params(tmp_path / "p.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
