import pytest
import torch

from imm_fast.config import ModelConfig, dit_config
from imm_fast.models import IMM

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
