"""`python -m imm_fast config`: every key with its field doc, and the output loads back unchanged."""
import dataclasses
import subprocess
import sys

import pytest

from imm_fast._config_doc import field_docs, to_yaml
from imm_fast.config import PRESETS, TrainConfig, load_train_config


def _all_dataclasses(cfg, out):
    out.append(type(cfg))
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            _all_dataclasses(getattr(cfg, f.name), out)
    return out


def test_every_field_has_a_doc():
    for cls in _all_dataclasses(TrainConfig(), []):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a trailing comment: {missing}"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_yaml_round_trip(preset, tmp_path):
    cfg = load_train_config(preset, {"max_steps": 7, "sample.steps": [1, 3]})
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    assert load_train_config(str(path)) == cfg


def test_cli_config_prints_commented_yaml_that_train_accepts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "imm_fast", "config", "max_steps=3", "model.depth=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "  depth: 1  # number of DiT blocks" in r.stdout
    assert "max_steps: 3  # optimizer steps" in r.stdout
    path = tmp_path / "run.yaml"
    path.write_text(r.stdout)
    assert load_train_config(str(path)) == load_train_config(None, {"max_steps": 3, "model.depth": 1})
    help_text = subprocess.run([sys.executable, "-m", "imm_fast", "train", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "python -m imm_fast config" in help_text
