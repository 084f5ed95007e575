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


def test_section_headings_are_comment_lines_not_glued_to_the_previous_key():
    """A comment line at a field's own indentation heads the fields below it: printed as its own `# ...` line,
    never appended to the previous key's doc."""
    text = to_yaml(PRESETS["cifar10"])
    lines = text.splitlines()
    i = lines.index("final_eval: true  # compute metrics at the end of training")
    assert lines[i + 1].startswith("# Train-time FID of the EMA model") and lines[i + 2].startswith("eval_num: ")
    assert not any("Train-time FID" in line for line in lines if not line.lstrip().startswith("#"))
    reference = next(line for line in lines if line.startswith("reference: "))
    assert reference.endswith("the fused kernels that auto picks on CUDA")  # a real continuation is kept
    digits = to_yaml(PRESETS["digits"]).splitlines()
    fused = next(line for line in digits if line.startswith("  fused: "))
    assert fused.endswith("# fused kernels in the DiT: None = auto (CUDA with triton), True, False"), fused


def test_cifar10_prints_only_the_songunets_fields():
    text = to_yaml(PRESETS["cifar10"])
    model = [line.split(":")[0].strip() for line in text.split("\nloss:")[0].split("model:", 1)[1].splitlines()
             if line.startswith("  ") and not line.lstrip().startswith("#")]
    for dit_only in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "qk_norm", "fused"):
        assert dit_only not in model
    for unet in ("model_channels", "channel_mult", "num_blocks", "encoder_type", "resample_filter"):
        assert unet in model
    digits = to_yaml(PRESETS["digits"])
    assert "model_channels" not in digits and "  depth: 4  # number of DiT blocks" in digits


# Every key of the model section before each backbone had its own (DiT and UNet fields side by side).
OLD_FLAT_DIT = dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, qk_norm=False, fused=None)
OLD_FLAT_UNET = dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, channel_mult_noise=1,
                     num_blocks=4, attn_resolutions=[16], encoder_type="standard", decoder_type="standard",
                     resample_filter=[1, 1], channels_last=True, embedding_type="positional")


@pytest.mark.parametrize("preset", ["digits", "cifar10"])
def test_configs_saved_in_the_old_flat_layout_still_load(tmp_path, preset):
    import json

    from imm_fast.config import config_to_dict

    cfg = PRESETS[preset]
    d = json.loads(json.dumps(config_to_dict(cfg)))
    own = set(d["model"])
    d["model"] = {**OLD_FLAT_DIT, **OLD_FLAT_UNET, **d["model"]}  # the other backbone's fields at their defaults
    assert set(d["model"]) > own
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    assert load_train_config(path) == cfg
    d["model"]["depthh"] = 3  # a real typo is still refused
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="depthh"):
        load_train_config(path)
