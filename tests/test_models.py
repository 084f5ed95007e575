import dataclasses

import pytest
import torch

from imm_fast._fields import spec
from imm_fast.config import ModelConfig, dit_config
from imm_fast.models import IMM, registry

from _helpers import random_model


def as_float64(m):
    m.double()
    m.compute_dtype = torch.float64
    return m


def tiny(**kw):
    base = dict(img_resolution=8, img_channels=3, label_dim=5, patch_size=2, hidden_size=32, depth=2, num_heads=4)
    return random_model(**{**base, **kw})


@pytest.mark.parametrize("f_type,ns,temb", [("euler_fm", "fm", "stride"), ("simple_edm", "fm", "identity"),
                                            ("simple_edm", "vp_cosine", "identity"), ("identity", "fm", "identity"),
                                            ("identity", "vp_cosine", "stride")])
def test_f_tt_is_identity(f_type, ns, temb):
    m = as_float64(tiny(f_type=f_type, noise_schedule=ns, temb_type=temb))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.rand(3, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(m(x, t, t, class_labels=torch.tensor([0, 1, 5])), x, rtol=0, atol=1e-12)


def test_parameter_names_follow_the_reference_dit():
    names = set(tiny(qk_norm=True).state_dict())
    for key in ["model.x_embedder.proj.weight", "model.t_embedder.mlp.0.weight", "model.s_embedder.mlp.2.bias",
                "model.y_embedder.embedding_table.weight", "model.blocks.1.attn.qkv.weight",
                "model.blocks.1.attn.proj.bias", "model.blocks.0.mlp.fc1.weight", "model.blocks.0.mlp.fc2.bias",
                "model.blocks.0.adaLN_modulation.1.weight", "model.final_layer.linear.weight",
                "model.final_layer.adaLN_modulation.1.bias", "model.pos_embed", "model.blocks.0.attn.q_norm.weight",
                "model.blocks.0.attn.k_norm.bias"]:
        assert key in names, key


def test_label_table_has_the_null_class_row():
    m = tiny(label_dim=7)
    assert m.model.y_embedder.embedding_table.weight.shape[0] == 8


@pytest.mark.parametrize("name,expect", [("XL/2", (1152, 28, 16, 2)), ("B/4", (768, 12, 12, 4)), ("S/8", (384, 12, 6, 8)),
                                         ("L/2", (1024, 24, 16, 2))])
def test_dit_sizes(name, expect):
    c = dit_config(name)
    assert (c.hidden_size, c.depth, c.num_heads, c.patch_size) == expect


def test_xl_head_dim_is_72():
    c = dit_config("XL/2")
    assert c.hidden_size // c.num_heads == 72


def test_int_ids_and_one_hot_rows_agree_and_null_is_zero_row():
    m = tiny()
    x = torch.randn(4, 3, 8, 8)
    ids = torch.tensor([0, 3, 4, 5])  # 5 = null
    rows = torch.nn.functional.one_hot(ids, 6)[:, :5].float()
    assert rows[3].sum() == 0
    t, s = torch.full((4,), 0.7), torch.full((4,), 0.2)
    torch.testing.assert_close(m(x, t, s, class_labels=ids), m(x, t, s, class_labels=rows), rtol=0, atol=0)
    with pytest.raises(ValueError, match="class_labels"):
        m(x, t, s, class_labels=torch.tensor([0, 1, 2, 6]))


def test_scalar_and_per_sample_times_agree():
    m = tiny()
    x = torch.randn(3, 3, 8, 8)
    a = m(x, 0.8, 0.3, class_labels=torch.tensor([1, 2, 3]))
    b = m(x, torch.full((3,), 0.8), torch.full((3,), 0.3), class_labels=torch.tensor([1, 2, 3]))
    torch.testing.assert_close(a, b)


def test_guidance_is_the_linear_combination():
    m = tiny(f_type="euler_fm")
    x = torch.randn(3, 3, 8, 8)
    lab = torch.tensor([1, 2, 3])
    t, s = torch.tensor(0.9), torch.tensor(0.4)
    cond, uncond = m(x, t, s, class_labels=lab), m(x, t, s, class_labels=torch.full((3,), 5))
    # euler_fm is affine in G, so f(G_u + w (G_c - G_u)) = f_u + w (f_c - f_u)
    torch.testing.assert_close(m(x, t, s, class_labels=lab, cfg_scale=1.5), uncond + 1.5 * (cond - uncond),
                               rtol=1e-5, atol=1e-5)


def test_unconditional_model():
    m = tiny(label_dim=0)
    y = m(torch.randn(2, 3, 8, 8), 0.5, 0.1)
    assert y.shape == (2, 3, 8, 8) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="cfg_scale"):
        m(torch.randn(2, 3, 8, 8), 0.5, 0.1, cfg_scale=1.5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_switch_same_math_and_state_dict(qk_norm):
    """The fused path (ops dispatch; reference ops on CPU) equals the reference path, output and gradients."""
    ref = as_float64(tiny(qk_norm=qk_norm, depth=3)).train()
    fused = as_float64(IMM(**{**ref.init_kwargs, "fused": True})).train()
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t, s = torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    outs = []
    for m in (ref, fused):
        y = m(x, t, s, class_labels=torch.tensor([1, 2]))
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], msg=name)


def test_bad_config_values():
    with pytest.raises(ValueError, match="f_type"):
        ModelConfig(f_type="edm")
    with pytest.raises(ValueError, match="euler_fm"):
        ModelConfig(f_type="euler_fm", noise_schedule="vp_cosine")
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="DiT name"):
        dit_config("XXL/2")


def test_dropout_respects_train_mode():
    m = tiny(dropout=0.5)
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    torch.testing.assert_close(m(x, 0.7, 0.2), m(x, 0.7, 0.2))
    m.train()
    assert not torch.equal(m(x, 0.7, 0.2), m(x, 0.7, 0.2))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_dit_with_triton_kernels_matches_reference(monkeypatch, qk_norm):
    """fused=True with the Triton adaLN and attention kernels (interpreter on the CPU) against the reference DiT:
    outputs and every parameter gradient, fp32."""
    from imm_fast import _backend

    if not _backend.triton_usable(torch.device("cpu")):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    monkeypatch.setenv("IMM_FAST_BACKEND", "triton")
    ref = tiny(qk_norm=qk_norm, depth=2, hidden_size=32, num_heads=2).train()
    fused = IMM(**{**ref.init_kwargs, "fused": True}).train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 8)
    t, s = torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.1])
    results = []
    for m in (ref, fused):
        y = m(x, t, s, class_labels=torch.tensor([1, 5]))
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    import sys

    assert "imm_fast.kernels.adaln" in sys.modules and "imm_fast.kernels.attention" in sys.modules
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# The backbone registry: a new backbone is one module (here: the class pair below) and resolves everywhere
# ---------------------------------------------------------------------------------------------------------------

class ToyNet(torch.nn.Module):
    """G(x, t, s) = conv(silu(conv(x) + pos + emb(t, s))): the smallest network with the backbone interface."""

    def __init__(self, img_resolution, in_channels, label_dim=0, width=8, s_embed=True, dropout=0.0, **kwargs):
        super().__init__()
        self.toy_in = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.pos = torch.nn.Parameter(torch.randn(1, width, img_resolution, img_resolution) * 0.1)
        self.emb = torch.nn.Linear(2, width)
        self.out = torch.nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x, noise_labels_t, noise_labels_s, class_labels=None):
        ts = torch.stack(torch.broadcast_tensors(noise_labels_t, noise_labels_s), dim=-1) / 1000  # (N|1, 2)
        h = self.toy_in(x) + self.pos + self.emb(ts.to(x.dtype))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


@dataclasses.dataclass(frozen=True)
class ToyConfig(registry.ModelConfig):
    name = "Toy"
    network = ToyNet
    imm_defaults = dict(f_type="simple_edm", temb_type="identity")  # what a bare state dict of it is loaded with

    width: int = spec(8, ge=1, cap=1024)   # hidden channels of the toy network

    def backbone_kwargs(self):
        return dict(width=self.width, s_embed=self.s_embed, dropout=self.dropout)

    @classmethod
    def network_kwargs(cls, img_resolution, img_channels, label_dim, model_kwargs):
        return dict(img_resolution=img_resolution, in_channels=img_channels, label_dim=label_dim, **model_kwargs)

    @classmethod
    def owns(cls, state_dict):
        return "model.toy_in.weight" in state_dict

    @classmethod
    def infer(cls, state_dict, num_heads=None, source="the state dict"):
        width, channels = state_dict["model.toy_in.weight"].shape[:2]
        return dict(model_type="Toy", img_resolution=state_dict["model.pos"].shape[-1], img_channels=channels,
                    label_dim=0, width=width)


@pytest.fixture
def toy():
    registry.register(ToyConfig)
    yield ToyConfig
    registry.unregister("Toy")


TOY = dict(model_type="Toy", img_resolution=8, img_channels=1, label_dim=0, width=6, f_type="simple_edm",
           temb_type="identity", eps=0.006)


def test_a_registered_backbone_builds_saves_loads_and_is_inferred(toy, tmp_path):
    import imm_fast
    from imm_fast import checkpoints as checkpoint
    from imm_fast._config_doc import to_yaml
    from imm_fast.config import PRESETS, check_fits, load_train_config
    from imm_fast.models import build_model

    cfg = ModelConfig(**TOY)
    assert type(cfg) is ToyConfig and cfg.width == 6
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    want = model(x, torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64))
    checkpoint.save_model(tmp_path / "toy.safetensors", model)  # init kwargs in the metadata
    torch.save(model.state_dict(), tmp_path / "toy.pt")  # a bare state dict: the backbone infers itself
    for path, kw in ((tmp_path / "toy.safetensors", None), (tmp_path / "toy.pt", {"eps": 0.006})):
        loaded = imm_fast.load_official(path, model_kwargs=kw)
        assert loaded.model_type == "Toy" and loaded.model.toy_in.out_channels == 6
        got = loaded(x, torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    run = load_train_config("digits", {"model.model_type": "Toy", "model.width": 4})
    assert type(run.model) is ToyConfig and (run.model.width, run.model.img_resolution) == (4, 8)
    assert "  width: 4  # hidden channels of the toy network" in to_yaml(run)
    assert "depth" not in to_yaml(run.model)
    check_fits(run, "cpu", available=2**30)  # counted on the meta device: no analytic bound needed
    assert "width" in registry.constructor_parameters("Toy")
    with pytest.raises(ValueError, match="model.width=5000 exceeds the cap 1024"):
        ModelConfig(**{**TOY, "width": 5000})
    with pytest.raises(ValueError, match="unknown config key 'model.width'"):
        load_train_config("digits", {"model.width": 4})  # a Toy field on the DiT
    assert PRESETS["digits"].model.model_type == "DiT"


def test_model_type_resolves_in_one_place():
    from imm_fast.models import IMM, DiTConfig, SongUNetConfig, dit_config

    assert registry.names()[:3] == ("DiT", "SongUNet", "DhariwalUNet")
    assert registry.resolve("SongUNet") == (SongUNetConfig, {})
    assert registry.resolve("DiT_B_4") == (DiTConfig, dict(patch_size=4, hidden_size=768, depth=12, num_heads=12))
    for bad in (lambda: ModelConfig(model_type="UNet"), lambda: IMM(8, 1, model_type="UNet"),
                lambda: registry.resolve("DiT_XXL_2")):
        with pytest.raises(ValueError, match=r"model_type='(UNet|DiT_XXL_2)' is not one of \('DiT', 'SongUNet'"):
            bad()
    assert dit_config("S/2").hidden_size == 384 and DiTConfig.variant("XL/4").patch_size == 4
    with pytest.raises(ValueError, match="checkpoint alias"):
        ModelConfig(model_type="DiT_XL_2")
