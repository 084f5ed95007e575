"""Hostile and broken checkpoint and data files: each is refused quickly with an error naming the file and the field
(issue 11, item 7), never a bare RecursionError/KeyError, a minutes-long build or a silent guess."""
import dataclasses
import json
import pickle
import time
import zipfile

import pytest
import torch
import torch.nn as nn

import imm_fast
from imm_fast.checkpoints import ZIP_EXPANSION, save_model
from imm_fast.errors import CheckpointError, ConfigError, DataError

from _helpers import assert_load_refused, random_model
from _official_format import install_fake_modules, write_official_pickle

BASE = dict(img_resolution=8, img_channels=4, label_dim=6, patch_size=2, hidden_size=32, depth=2, num_heads=4)


def small(**kw):
    return random_model(**{**BASE, **kw})


def write_net_pickle(path, monkeypatch, state):
    """{'ema': an authors'-format IMMPrecond record whose __dict__ is `state`}."""
    classes = install_fake_modules(monkeypatch, "raise SystemExit('never run me')")
    cls = classes["IMM"]
    net = cls.__new__(cls)
    net.__dict__.update(state)
    with open(path, "wb") as f:
        pickle.dump({"ema": net, "step": 1}, f)
    return path


def same_outputs(a, b):
    x = torch.randn(2, a.img_channels, a.img_resolution, a.img_resolution)
    lab = torch.tensor([0, 3])
    torch.testing.assert_close(b(x, 0.8, 0.3, class_labels=lab), a(x, 0.8, 0.3, class_labels=lab), rtol=0, atol=0)


def test_pickle_whose_module_contains_itself(tmp_path, monkeypatch):
    loop = nn.Sequential()
    loop._modules["again"] = loop
    path = write_net_pickle(tmp_path / "loop.pkl", monkeypatch, dict(
        _init_args=(), _init_kwargs=dict(BASE), _parameters={}, _buffers={}, _modules={"model": loop}))
    with pytest.raises(CheckpointError, match=r"loop\.pkl.*'model\.again' contains itself"):
        imm_fast.load_official(path)


def test_pickle_nested_too_deep(tmp_path, monkeypatch):
    top = inner = nn.Sequential()
    for _ in range(300):
        nxt = nn.Sequential()
        inner._modules["m"] = nxt
        inner = nxt
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20000))  # pickling 300 levels recurses; loading them must not
    try:
        path = write_net_pickle(tmp_path / "deep.pkl", monkeypatch, dict(
            _init_args=(), _init_kwargs=dict(BASE), _parameters={}, _buffers={}, _modules={"model": top}))
    finally:
        sys.setrecursionlimit(old)
    with pytest.raises(CheckpointError, match=r"deep\.pkl.*nest deeper"):
        imm_fast.load_official(path)


def test_zip_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(256):  # 256 MB of zeros
                f.write(chunk)
    size = path.stat().st_size
    assert size < 2 << 20
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"bomb\.pt.*268,435,456 bytes.*zip bomb"):
        imm_fast.load_official(path)
    assert time.perf_counter() - t0 < 5
    # A real torch.save archive (tensors stored uncompressed) is far below the limit.
    m = small()
    torch.save(m.state_dict(), tmp_path / "ok.pt")
    decl = sum(i.file_size for i in zipfile.ZipFile(tmp_path / "ok.pt").infolist())
    assert decl <= ZIP_EXPANSION * (tmp_path / "ok.pt").stat().st_size


def test_tensor_claiming_more_bytes_than_the_file(tmp_path, monkeypatch):
    huge = torch.zeros(1).expand(100_000, 100_000)  # a stride-0 view: 40 GB declared over 4 bytes
    path = write_net_pickle(tmp_path / "huge.pkl", monkeypatch, dict(
        _init_args=(), _init_kwargs=dict(BASE), _parameters={"w": huge}, _buffers={}, _modules={}))
    with pytest.raises(CheckpointError, match=r"huge\.pkl.*tensor 'w' declares shape \(100000, 100000\)"):
        imm_fast.load_official(path)


@pytest.mark.parametrize("field,value,words", [
    ("depth", 10_000_000, ["init_kwargs.depth=10000000", "cap"]),
    ("depth", 500, ["depth=500", "parameters"]),  # under the cap, but the file stores a 2-block model
    ("hidden_size", 1 << 20, ["init_kwargs.hidden_size", "cap"]),
    ("depth", "12", ["init_kwargs.depth='12'", "an int"]),
    ("depth", 0, ["init_kwargs.depth=0", ">= 1"]),
])
def test_model_dimensions_are_capped_and_checked(tmp_path, field, value, words):
    from safetensors.torch import save_file

    m = small()
    kw = {**m.init_kwargs, field: value}
    path = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"format": "imm_fast", "init_kwargs": json.dumps(kw)})
    assert_load_refused(path, 5, words)
    from imm_fast.models.dit import DiTConfig

    capped = {f.name for f in dataclasses.fields(DiTConfig) if getattr(f.metadata.get("rule"), "cap", None)}
    assert capped >= {"depth", "hidden_size", "num_heads"}


def test_missing_and_wrong_typed_init_kwargs(tmp_path, monkeypatch):
    m = small()
    good = {k: v for k, v in m.init_kwargs.items() if k != "fused"}
    cases = [
        ({}, r"carries no '_init_kwargs'"),
        ({"_init_kwargs": [1, 2]}, r"field '_init_kwargs' of 'ema' must be a dict"),
        ({"_init_kwargs": {k: v for k, v in good.items() if k != "img_resolution"}},
         r"init_kwargs lack \['img_resolution'\]"),
        ({"_init_kwargs": {**good, "sigma_data": "half"}}, r"sigma_data='half' must be a number"),
        ({"_init_kwargs": {**good, "f_type": "edm"}}, r"f_type='edm' is not one of"),
        ({"_init_kwargs": dict(good), "_init_args": 5}, r"field '_init_args' of 'ema' must be a tuple"),
    ]
    for i, (state, pattern) in enumerate(cases):
        path = write_net_pickle(tmp_path / f"k{i}.pkl", monkeypatch, {
            "_init_args": (), "_parameters": {}, "_buffers": {}, "_modules": {}, **state})
        with pytest.raises(CheckpointError, match=rf"k{i}\.pkl.*{pattern}"):
            imm_fast.load_official(path)
    # A state dict that does not fit the kwargs names the file and the tensors.
    path = tmp_path / "wrong.pkl"
    write_official_pickle(path, m, {**good, "depth": 3}, monkeypatch)
    with pytest.raises(CheckpointError, match=r"wrong\.pkl.*does not match.*missing \['model\.blocks\.2"):
        imm_fast.load_official(path)


def test_bad_safetensors_metadata(tmp_path):
    from safetensors.torch import save_file

    m = small()
    tensors = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "imm_fast", "init_kwargs": "{nope"})
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*metadata field 'init_kwargs'"):
        imm_fast.load_official(tmp_path / "a.safetensors")
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"format": "imm_fast", "init_kwargs": "[1]"})
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*init_kwargs must be a dict"):
        imm_fast.load_official(tmp_path / "b.safetensors")


def test_bad_checkpoint_config_json_names_the_file(tmp_path):
    from imm_fast.config import load_train_config, read_config_file

    ck = tmp_path / "step-0000002"
    ck.mkdir()
    (ck / "config.json").write_text('{"max_steps": 2, ')
    with pytest.raises(ConfigError, match=r"step-0000002/config\.json.*not valid JSON"):
        read_config_file(ck / "config.json")
    (ck / "config.json").write_text(json.dumps({"sample": {"sampler": "restrat"}}))
    with pytest.raises(ConfigError, match=r"sample\.sampler='restrat'.*config file .*step-0000002/config\.json"):
        load_train_config(read_config_file(ck / "config.json"), {}, source=ck / "config.json")
    (ck / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"config\.json.*must hold a mapping"):
        read_config_file(ck / "config.json")


def test_legacy_pth_loads_or_names_the_file(tmp_path):
    m = small()
    sd = {k[len("model."):]: v for k, v in m.state_dict().items()}
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    loaded = imm_fast.load_official(path, model_kwargs=dict(num_heads=4, f_type="euler_fm", temb_type="stride"))
    same_outputs(m, loaded)
    torch.save([1, 2, 3], tmp_path / "list.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"list\.pth.*holds no state dict"):
        imm_fast.load_official(tmp_path / "list.pth")
    torch.save({"x.weight": torch.zeros(2)}, tmp_path / "other.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"other\.pth.*no tensor 'model\.x_embedder\.proj\.weight'"):
        imm_fast.load_official(tmp_path / "other.pth")


def test_head_count_is_never_guessed(tmp_path):
    m = small()  # hidden 32, 4 heads: not a DiT-paper width, and no qk-norm weights to read head_dim from
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"sd\.pt.*attention heads.*model_kwargs=\{'num_heads': H\}"):
        imm_fast.load_official(tmp_path / "sd.pt")
    same_outputs(m, imm_fast.load_official(tmp_path / "sd.pt", model_kwargs={"num_heads": 4}))
    q = small(qk_norm=True)  # LayerNorm(head_dim) weights: 32 / 8 = 4 heads, unambiguous
    torch.save(q.state_dict(), tmp_path / "qk.pt")
    loaded = imm_fast.load_official(tmp_path / "qk.pt")
    assert loaded.model.blocks[0].attn.num_heads == 4
    same_outputs(q, loaded)


def test_truncated_or_bogus_image_names_the_file(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    from imm_fast.config import DataConfig
    from imm_fast.data import build_dataset

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(2):
        Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=95)
    data = (root / "1.jpg").read_bytes()
    (root / "1.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"could not read image .*1\.jpg"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "imgs")))
    (root / "1.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"could not read image .*1\.jpg"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "imgs")))
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"x\.npy"):
        build_dataset(DataConfig(source="array", path=str(bad)))


def test_truncated_npz_names_the_file(tmp_path):
    import numpy as np

    from imm_fast.data import load_array

    p = tmp_path / "a.npz"
    np.savez(p, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"a\.npz"):
        load_array(p)
