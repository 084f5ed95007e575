"""Every config field is checked when the config is built: types, ranges and choices, with the dotted key, the bad
value and what is allowed in the message; presets still build; configs round-trip through YAML and JSON."""
import dataclasses
import json
import math
from typing import Optional, Tuple

import pytest

from imm_fast import config as C
from imm_fast.config import (PRESETS, ConfigError, DataConfig, LossConfig, ModelConfig, SampleConfig, TrainConfig,
                             config_to_dict, load_train_config, spec)
from imm_fast.errors import ConfigTypeError, UserError

# (dotted key, bad value, words the message must hold besides the key)
TYPOS = [
    ("sample.sampler", "restrat", ["'restrat'", "pushforward", "restart"]),
    ("sample.steps", 4, ["list of ints"]),
    ("sample.steps", [1.5], ["list of ints"]),
    ("sample.steps", [], ["at least 1"]),
    ("sample.grid", "cosine", ["'cosine'", "uniform", "edm", "list of numbers"]),
    ("sample.grid", [math.nan], ["finite"]),
    ("sample.grid", [1e9], ["strictly between"]),
    ("sample.grid", [0.5, 1.0], ["strictly decreasing"]),
    ("sample.grid", [-1.0], ["> 0"]),
    ("sample.num_images", 0, [">= 1"]),
    ("sample.cfg_scale", math.inf, ["finite"]),
    ("sample.cfg_scale", "two", ["number", "None"]),
    ("eval_steps", [0], [">= 1"]),
    ("eval_steps", 2, ["list of ints"]),
    ("eval_samples", 0, [">= 1"]),
    ("lr", math.nan, ["finite", "> 0"]),
    ("lr", math.inf, ["finite", "> 0"]),
    ("lr", "nan", ["finite"]),
    ("lr", 0, ["> 0"]),
    ("seed", 1.5, ["an int", "float"]),
    ("seed", -1, ["[0, 4294967295]"]),
    ("seed", 2**40, ["[0, 4294967295]"]),
    ("grad_clip", -1, [">= 0"]),
    ("loss.k", -1, [">= 0"]),
    ("loss.k", 2.5, ["an int"]),
    ("loss.kernel_eps", 0, ["> 0"]),
    ("loss.backend", "bogus", ["'bogus'", "torch", "None"]),
    ("loss.kernel", "gauss", ["laplace", "rbf"]),
    ("loss.a", 3, ["(1, 2)"]),
    ("loss.group_size", 0, [">= 1"]),
    ("loss.label_dropout", 1.0, ["[0, 1)"]),
    ("loss.ts_dist", "normal", ["uniform", "lognormal"]),
    ("loss.target_fp32", "yes", ["true or false"]),
    ("model.depth", 0, [">= 1"]),
    ("model.num_heads", 0, [">= 1"]),
    ("model.sigma_data", 0, ["> 0"]),
    ("model.sigma_data", -0.5, ["> 0"]),
    ("model.fused", "yes", ["true or false", "None"]),
    ("model.qk_norm", 1, ["true or false"]),
    ("model.hidden_size", 130, ["divisible", "model.num_heads"]),
    ("model.img_resolution", 9, ["divisible", "model.patch_size"]),
    ("model.T", 1.5, ["(0, 1]"]),
    ("model.eps", 0.995, ["model.T"]),
    ("model.f_type", "edm", ["euler_fm", "simple_edm", "identity"]),
    ("model.noise_schedule", "vp_cosine", ["model.f_type", "'fm'"]),  # euler_fm needs fm
    ("model.mixed_precision", "fp8", ["bf16", "fp16"]),
    ("model.dropout", 1.0, ["[0, 1)"]),
    ("model.label_dim", -1, [">= 0"]),
    ("data.source", "imagenet", ["digits", "latents"]),
    ("data.split", "val", ["train", "test", "all"]),
    ("data.resolution", 0, [">= 1"]),
    ("data.hflip", "true", ["true or false"]),
    ("data.vae_path", "/some/vae", ["latents", "data.source='digits'"]),
    ("betas", 0.9, ["list of 2 numbers"]),
    ("betas", [0.9, 1.0], ["[0, 1)"]),
    ("betas", [0.9, 0.99, 0.999], ["list of 2 numbers"]),
    ("device", "tpu", ["'tpu'", "cpu", "cuda"]),
    ("device", "cuda:x", ["cuda:<index>"]),
    ("threads", -1, [">= 1"]),
    ("threads", 0, [">= 1"]),
    ("batch_size", 18, ["divisible"]),
    ("batch_size", 0, [">= 1"]),
    ("max_steps", 10.5, ["an int"]),
    ("warmup_steps", -1, [">= 0"]),
    ("ema_decay", 1.0, ["[0, 1)"]),
    ("weight_decay", -0.1, [">= 0"]),
    ("optimizer", "sgd", ["adamw", "radam"]),
    ("amp", "fp32", ["bf16"]),
    ("compile", "everything", ["regional", "full"]),
    ("log_every", 0, [">= 1"]),
    ("ckpt_every", -1, [">= 0"]),
    ("final_eval", "no", ["true or false"]),
    ("run_name", "../elsewhere", ["plain folder name"]),
    ("out_dir", "", ["empty"]),
    ("name", 3, ["a string"]),
    ("model", 5, ["ModelConfig"]),
    # Values that were accepted and then failed deep inside a run (a traceback, or an allocation after training).
    ("lr", 1e38, ["cap", "1000"]),  # AdamW's lr / (1 - beta1) overflows float32: refused here instead
    ("name", "../../escaped", ["plain folder name"]),
    ("name", "a/b/c", ["plain folder name"]),
    ("name", "n" * 300, ["at most 200 characters"]),
    ("loss.k", 100000, ["cap", "52"]),
    ("threads", 100000, ["cap"]),
    ("model.hidden_size", 10**12, ["cap"]),
    ("model.depth", 10**7, ["cap"]),
    ("sample.num_images", 10**12, ["cap"]),
    ("eval_num", 10**12, ["cap"]),
    ("batch_size", 10**12, ["cap"]),
    ("weight_decay", 2e4, ["lr", "weight_decay", "<= 1"]),
]


@pytest.mark.parametrize("key,value,words", TYPOS, ids=[f"{k}={v!r}" for k, v, _ in TYPOS])
def test_typo_fails_at_config_time_naming_key_value_and_allowed(key, value, words):
    with pytest.raises(ConfigError) as info:
        load_train_config(None, {key: value})
    msg = str(info.value)
    assert isinstance(info.value, (ValueError, UserError))
    assert f"{key}=" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_type_errors_are_also_type_errors():
    with pytest.raises(TypeError, match="seed=1.5"):
        TrainConfig(seed=1.5)
    with pytest.raises(ConfigTypeError, match="model.fused='yes'"):
        ModelConfig(fused="yes")


def test_nested_configs_name_their_section_when_built_directly():
    with pytest.raises(ConfigError, match=r"^sample\.sampler='restrat' is not one of"):
        SampleConfig(sampler="restrat")
    with pytest.raises(ConfigError, match=r"^loss\.k=-1"):
        LossConfig(k=-1)
    with pytest.raises(ConfigError, match=r"^data\.source="):
        DataConfig(source="nope")
    with pytest.raises(ConfigError, match=r"^model\.depth=0"):
        ModelConfig(depth=0)


def test_unknown_keys_are_named_with_their_section():
    with pytest.raises(ConfigError, match="unknown config key 'model.depthh'"):
        load_train_config(None, {"model.depthh": 3})
    with pytest.raises(ConfigError, match="'lr.x'.*not a section"):
        load_train_config(None, {"lr.x": 1})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_through_yaml_and_json(tmp_path, name):
    yaml = pytest.importorskip("yaml")
    cfg = PRESETS[name]
    assert load_train_config(name) == cfg
    d = config_to_dict(cfg)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(json.loads(json.dumps(d))))  # tuples as lists, as a user's file has them
    assert load_train_config(str(f)) == cfg
    j = tmp_path / "c.json"
    j.write_text(json.dumps(d))
    assert load_train_config(j) == cfg
    assert hash(load_train_config(str(f))) == hash(cfg)  # lists came back as tuples: still frozen and hashable


def test_normalization_and_yaml_quirks():
    cfg = load_train_config(None, {"lr": "1e-3", "max_steps": 1e3, "sample.steps": [1, 2], "model.sigma_data": 1,
                                   "sample.grid": [1.0, 0.5], "betas": [0, 0.99]})
    assert cfg.lr == 1e-3 and cfg.max_steps == 1000 and type(cfg.max_steps) is int
    assert cfg.sample.steps == (1, 2) and cfg.sample.grid == (1.0, 0.5) and cfg.betas == (0.0, 0.99)
    assert type(cfg.model.sigma_data) is float and type(cfg.betas[0]) is float
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json.*not valid JSON"):
        load_train_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_train_config(lst)
    typo = tmp_path / "typo.yaml"
    typo.write_text("sample:\n  sampler: restrat\n")
    with pytest.raises(ConfigError, match=r"sample\.sampler='restrat'.*typo\.yaml"):
        load_train_config(typo)
    with pytest.raises(ConfigError, match="cannot read config file"):
        C.read_config_file(tmp_path / "missing.json")


def test_a_new_field_check_is_one_line():
    @dataclasses.dataclass(frozen=True)
    class Extra:
        _section = "extra"
        max_nonfinite_steps: int = spec(3, ge=1)  # the one line
        widths: Tuple[int, ...] = spec((1, 2), ge=1)
        mode: Optional[str] = spec(None, choices=("a", "b"))

        def __post_init__(self):
            C._validate(self)

    assert Extra().max_nonfinite_steps == 3
    with pytest.raises(ConfigError, match=r"extra\.max_nonfinite_steps=0 is out of range: must be >= 1"):
        Extra(max_nonfinite_steps=0)
    with pytest.raises(ConfigTypeError, match=r"extra\.widths=\[1, 2.5\] must be a list of ints"):
        Extra(widths=[1, 2.5])
    with pytest.raises(ConfigError, match=r"extra\.mode='c' is not one of \('a', 'b'\) \(or None\)"):
        Extra(mode="c")


def test_one_list_per_choice_shared_with_the_code():
    from imm_fast import sampling, schedule

    assert schedule.SCHEDULES is C.NOISE_SCHEDULES
    assert sampling.SAMPLERS is C.SAMPLERS and sampling.GRIDS is C.GRIDS
    from imm_fast import _backend
    from imm_fast.ops import mmd  # noqa: F401  (registers mmd's backends)

    with pytest.raises(ConfigError, match=str(_backend.names("mmd")).replace("(", r"\(").replace(")", r"\)")):
        LossConfig(backend="nope")


def test_imm_model_uses_the_shared_checks():
    from imm_fast.models import IMM

    base = dict(img_resolution=8, img_channels=3, label_dim=0, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="sigma_data=0"):
        IMM(**{**base, "sigma_data": 0})
    with pytest.raises(ConfigError, match="noise_schedule='cosine' is not one of"):
        IMM(**{**base, "noise_schedule": "cosine"})
    with pytest.raises(ConfigError, match="depth=0"):
        IMM(**{**base, "depth": 0})
    with pytest.raises(ConfigError, match="f_type='euler_fm' needs noise_schedule='fm'"):
        IMM(**{**base, "noise_schedule": "vp_cosine"})
    with pytest.raises(ConfigError, match="eps=0.9 must be < T=0.5"):
        IMM(**{**base, "eps": 0.9, "T": 0.5})


def test_sizes_that_cannot_fit_this_machine_are_refused_before_step_0():
    """Sizes under the caps that no machine here can hold: check_fits names the biggest parts (the run calls it
    before building anything). Lower bounds only: the presets fit a 64 GiB machine."""
    gib = 2**30
    for key, value, words in [("sample.num_images", 10**9, "sample grid"), ("batch_size", 10**9, "micro-batch"),
                              ("model.hidden_size", 32768, "parameters")]:
        cfg = load_train_config(None, {key: value, "model.num_heads": 4})
        with pytest.raises(ConfigError, match=rf"needs at least [\d,.]+ GiB on cpu but 8.00 GiB are free.*{words}"):
            C.check_fits(cfg, "cpu", available=8 * gib)
    for name in ("digits", "cifar10", "imagenet256-S"):
        C.check_fits(PRESETS[name], "cpu", available=64 * gib)
    with pytest.raises(ConfigError, match="threads=4096 is more than 4 x the"):
        C.check_fits(load_train_config(None, {"threads": 4096}), "cpu", available=64 * gib)


def test_lr_bound_is_what_adam_can_represent():
    """torch's AdamW divides lr by 1 - beta1^t in float32: lr=1e38 overflows at step 1. The cap refuses it while
    every lr up to the cap still steps to finite weights."""
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=C.LR_MAX, betas=(0.9, 0.999))
    p.grad = torch.randn(4)
    opt.step()
    assert torch.isfinite(p).all()
    assert TrainConfig(lr=C.LR_MAX).lr == C.LR_MAX


def _laughs(levels: int = 9) -> str:
    """YAML flow text of 10^levels ones built from aliases: level k holds ten copies of level k - 1."""
    text = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for k in range(1, levels):
        text = f"&a{k} [{text}, " + ", ".join([f"*a{k - 1}"] * 9) + "]"
    return text


@pytest.mark.parametrize("key", ["eval_steps", "max_steps", "name"])
def test_a_billion_laughs_is_refused_at_once(tmp_path, key):
    """About 500 bytes of nested YAML aliases under a known key expand to 10^9 values: refused by a size cap in
    well under a second, from a file and through the command line's override parser, with a short message."""
    import time

    from imm_fast.__main__ import parse_overrides

    path = tmp_path / "laughs.yaml"
    path.write_text(f"{key}: {_laughs()}\n")
    assert path.stat().st_size < 600
    t0 = time.perf_counter()
    errors = []
    for attempt in (lambda: load_train_config(str(path)),
                    lambda: load_train_config(None, parse_overrides([f"{key}={_laughs()}"]))):
        with pytest.raises(ConfigError) as info:
            attempt()
        errors.append(str(info.value))
    assert time.perf_counter() - t0 < 1.0
    for msg in errors:
        assert "more than 100,000 values" in msg and len(msg) < 300, msg[:500]


def test_error_messages_show_an_excerpt_of_a_bad_value():
    for key, value in [("name", "x" * 10**6), ("eval_steps", [0] + [1] * 50_000), ("sample.sampler", "s" * 10**5)]:
        with pytest.raises(ConfigError) as info:
            load_train_config(None, {key: value})
        assert f"{key}=" in str(info.value) and len(str(info.value)) < 400, str(info.value)[:600]


def test_no_import_circle_between_config_schedule_and_the_models():
    """Function-level imports included: the modules config.py imports never import config back."""
    import ast
    from pathlib import Path

    root = Path(C.__file__).parent
    below = [root / "schedule.py", root / "_fields.py", root / "errors.py", *sorted((root / "models").glob("*.py"))]
    for path in below:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n == "config" or n.endswith(".config") for n in names), (path.name, names)
