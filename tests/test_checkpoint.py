import json
import os
import pickle

import pytest
import torch

import imm_fast
from imm_fast.checkpoints import UnsafeCheckpointError, save_model

from _helpers import random_model as _random_model
from _official_format import write_official_pickle


def random_model(**kw):
    base = dict(img_resolution=8, img_channels=4, label_dim=6, patch_size=2, hidden_size=32, depth=2, num_heads=4)
    return _random_model(**{**base, **kw})


def authors_kwargs(m, **extra):
    """Init kwargs as the authors' IMMPrecond records them (their DiT keeps num_classes=1000 unless told)."""
    kw = {k: v for k, v in m.init_kwargs.items() if k != "fused"}
    kw.update(extra)
    return kw


def same_outputs(a, b):
    x = torch.randn(3, a.img_channels, a.img_resolution, a.img_resolution, dtype=torch.float64) * 0.5
    lab = torch.tensor([0, 2, a.label_dim]) if a.label_dim else None
    t, s = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64)
    torch.testing.assert_close(b(x, t, s, class_labels=lab), a(x, t, s, class_labels=lab), rtol=0, atol=0)
    if a.label_dim:
        torch.testing.assert_close(b(x, t, s, class_labels=lab, cfg_scale=1.5), a(x, t, s, class_labels=lab, cfg_scale=1.5),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("variant", [dict(f_type="euler_fm", temb_type="stride", eps=0.0),
                                     dict(f_type="simple_edm", temb_type="identity", eps=0.006, qk_norm=True),
                                     dict(f_type="identity", temb_type="identity", eps=0.006)])
def test_loads_authors_pickle_format(tmp_path, monkeypatch, variant):
    m = random_model(**variant)
    path = tmp_path / "ckpt.pkl"
    marker = tmp_path / "executed"
    import numpy as np

    write_official_pickle(path, m, authors_kwargs(m, T=np.float64(0.994)), monkeypatch,
                          module_src=f"open({str(marker)!r}, 'w').write('stored source was executed')")
    loaded = imm_fast.load_official(path)
    assert not marker.exists()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    same_outputs(m, loaded)
    save_model(tmp_path / "again.safetensors", loaded)  # numpy scalars became JSON-able floats


def test_authors_pickle_with_model_type_name(tmp_path, monkeypatch):
    """model_type 'DiT_S_4' selects the S sizes as the authors' class does (with its 1001-row label table, as
    their DiT keeps num_classes=1000); kwargs their DiT ignores are ignored here too, with a warning."""
    from imm_fast.models import IMM

    kw = dict(img_resolution=8, img_channels=4, label_dim=10, model_type="DiT_S_4", s_embed=True, f_type="euler_fm",
              temb_type="stride", noise_schedule="fm", sigma_data=0.5, T=0.994, eps=0.0, time_scale=1000)
    m = IMM(**kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    m.eval()
    assert m.model.y_embedder.embedding_table.weight.shape[0] == 1001
    assert m.model.blocks[0].attn.num_heads == 6 and len(m.model.blocks) == 12
    path = tmp_path / "ckpt.pkl"
    write_official_pickle(path, m, {**kw, "unused_unet_option": 3}, monkeypatch)
    with pytest.warns(UserWarning, match="unused_unet_option"):
        loaded = imm_fast.load_official(path)
    same_outputs(m, loaded)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_a_malicious_pickle(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": _Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        imm_fast.load_official(path)


def test_refuses_builtins_eval(tmp_path):
    class Evil2:
        def __reduce__(self):
            return (eval, ("__import__('os').getcwd()",))

    path = tmp_path / "evil2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": Evil2()}, f)
    with pytest.raises(UnsafeCheckpointError, match="eval"):
        imm_fast.load_official(path)


def test_own_safetensors_round_trip(tmp_path):
    m = random_model(f_type="simple_edm", temb_type="identity", eps=0.006)
    p = save_model(tmp_path / "m.safetensors", m)
    loaded = imm_fast.load_official(p)
    same_outputs(m, loaded)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_run_directory_prefers_ema(tmp_path):
    m = random_model()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in m.state_dict().items()}
    save_model(tmp_path / "model.safetensors", m)
    save_model(tmp_path / "ema.safetensors", m, ema)
    loaded = imm_fast.load_official(tmp_path)
    torch.testing.assert_close(loaded.state_dict()["model.pos_embed"], ema["model.pos_embed"])


def test_plain_state_dict_with_inferred_architecture(tmp_path):
    m = random_model(label_dim=6)
    sd = {k[len("model."):]: v for k, v in m.state_dict().items()}  # a bare DiT state dict
    torch.save(sd, tmp_path / "dit.pt")
    loaded = imm_fast.load_official(tmp_path / "dit.pt", model_kwargs=dict(num_heads=4, f_type="euler_fm",
                                                                            temb_type="stride"))
    same_outputs(m, loaded)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path="):
        imm_fast.load_official(tmp_path / "nope.pkl")
    bad = tmp_path / "bad.pkl"
    m = random_model()
    p = save_model(tmp_path / "m.safetensors", m)
    bad.write_bytes(b"\x80\x04" + p.read_bytes()[:50])
    with pytest.raises(ValueError):
        imm_fast.load_official(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="safetensors"):
        imm_fast.load_official(trunc)


def test_save_model_needs_an_imm_model(tmp_path):
    with pytest.raises(TypeError, match="model"):
        save_model(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------------------
# Training-state checkpoints: manifest, verification, the one `latest` resolver
# --------------------------------------------------------------------------------------------------------------
def test_training_checkpoints_resolve_to_the_newest_that_verifies(tmp_path, capsys):
    from imm_fast.checkpoints import find_checkpoint, resolve_checkpoint, save_checkpoint, verify_checkpoint

    m = random_model()
    for step in (1, 2, 3):
        ck = save_checkpoint(tmp_path, step, m, m.state_dict(), {"step": step}, {"step": step})
        assert verify_checkpoint(ck) is None
        manifest = json.loads((ck / "manifest.json").read_text())
        assert sorted(manifest["files"]) == ["config.json", "ema.safetensors", "model.safetensors", "train_state.pt"]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-0000003\n" and not list(root.glob(".tmp-*"))
    assert save_checkpoint(tmp_path, 3, m, {}, {}, {}) == root / "step-0000003"  # never overwritten
    assert resolve_checkpoint(tmp_path) == (root / "step-0000003", [])

    (root / "latest").write_text("step-0000001\n")  # a run killed before `latest` moved
    ck, notes = resolve_checkpoint(tmp_path)
    assert ck == root / "step-0000003" and "latest names step-0000001 but step-0000003 is newer" in notes[0]

    p = root / "step-0000003" / "ema.safetensors"  # truncated: the size gives it away
    p.write_bytes(p.read_bytes()[:-10])
    assert "ema.safetensors has" in verify_checkpoint(root / "step-0000003")
    assert find_checkpoint(root) == root / "step-0000002"  # the checkpoints/ folder works too
    assert "step-0000003 failed verification" in capsys.readouterr().err
    with pytest.raises(ValueError, match="corrupt"):
        find_checkpoint(root / "step-0000003")  # named explicitly: an error, no silent fallback
    (root / "step-0000002" / "manifest.json").unlink()  # unverifiable: accepted only when the caller opts in
    assert "has no manifest.json" in verify_checkpoint(root / "step-0000002")
    assert verify_checkpoint(root / "step-0000002", trust_unverified=True) is None
    (root / "step-0000001" / "config.json").unlink()
    assert "missing config.json" in verify_checkpoint(root / "step-0000001")
    with pytest.raises(ValueError, match="step-0000002 failed verification: has no manifest.json"):
        imm_fast.load_official(tmp_path)

    loaded = imm_fast.load_official(tmp_path, trust_unverified=True)  # load_official uses the same resolver
    same_outputs(m, loaded)
    for bad in ("../x/step-0000001", str(root / "step-0000001"), "latest", ""):
        (root / "latest").write_text(bad + "\n")
        with pytest.raises(ValueError, match="refusing to follow"):
            resolve_checkpoint(tmp_path)
