import pytest
import torch

import imm_fast
from imm_fast import schedule as sch
from imm_fast.sampling import time_grid

from _helpers import random_model


def model(**kw):
    base = dict(img_resolution=8, img_channels=2, label_dim=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                eps=0.006)
    return random_model(**{**base, **kw})


def test_grids():
    m = model()
    torch.testing.assert_close(time_grid(m, 4, "uniform"), torch.linspace(0.994, 0.006, 5, dtype=torch.float64))
    g = time_grid(m, 4, "edm")
    assert g.dtype == torch.float64 and len(g) == 5
    torch.testing.assert_close(g[[0, -1]], torch.tensor([0.994, 0.006], dtype=torch.float64))
    assert bool((g[1:] < g[:-1]).all())
    eta_min, eta_max = sch.eta_bounds(0.006, 0.994)
    e = (eta_max ** (1 / 7) + 0.5 * (eta_min ** (1 / 7) - eta_max ** (1 / 7))) ** 7
    torch.testing.assert_close(g[2], torch.tensor(e / (1 + e), dtype=torch.float64))
    mid = time_grid(m, 1, [1.4])
    t14 = torch.tensor(1.4, dtype=torch.float32).double() / (1 + torch.tensor(1.4, dtype=torch.float32).double())
    torch.testing.assert_close(mid, torch.tensor([0.994, t14.float().item(), 0.006], dtype=torch.float64))


def test_pushforward_is_the_chain_of_f():
    m = model()
    z = torch.randn(3, 2, 8, 8) * 0.5
    lab = torch.tensor([0, 1, 4])
    x = z.double()
    for a, b in [(0.994, 0.5), (0.5, 0.006)]:
        x = m(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), class_labels=lab,
              cfg_scale=2.0).double()
    out = imm_fast.sample(m, z, steps=2, grid=[1.0], class_labels=lab, cfg_scale=2.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_restart_noise_order_and_generator():
    m = model(f_type="simple_edm", temb_type="identity")
    z = torch.randn(2, 2, 8, 8) * 0.5
    torch.manual_seed(7)
    out = imm_fast.sample(m, z, steps=3, sampler="restart")
    torch.manual_seed(7)
    x = z.double()
    ts = torch.linspace(0.994, 0.006, 4, dtype=torch.float64)[:-1]
    for i, t in enumerate(ts):
        x = m(x, t, torch.ones_like(t) * 0.006).double()
        if i < len(ts) - 1:
            a, s = sch.alpha_sigma(ts[i + 1])
            x = a * x + s * (torch.randn_like(x) * 0.5)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(imm_fast.sample(m, z, steps=3, sampler="restart", generator=g1),
                               imm_fast.sample(m, z, steps=3, sampler="restart", generator=g2), rtol=0, atol=0)


def test_one_step_restart_equals_pushforward():
    m = model()
    z = torch.randn(2, 2, 8, 8) * 0.5
    torch.testing.assert_close(imm_fast.sample(m, z, 1, "restart", class_labels=torch.tensor([1, 2])),
                               imm_fast.sample(m, z, 1, "pushforward", class_labels=torch.tensor([1, 2])))


def test_bad_arguments():
    m = model()
    z = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match="sampler"):
        imm_fast.sample(m, z, sampler="euler")
    with pytest.raises(ValueError, match="noise"):
        imm_fast.sample(m, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        imm_fast.sample(m, z, steps=0)
    with pytest.raises(ValueError, match="grid"):
        imm_fast.sample(m, z, grid="cosine")
    with pytest.raises(ValueError, match="cfg_scale"):
        imm_fast.sample(model(label_dim=0), z, cfg_scale=1.5)


@pytest.mark.parametrize("grid,pattern", [
    ([float("nan")], "finite positive"),
    ([float("inf")], "finite positive"),
    ([0.0], "finite positive"),
    ([1e9], "strictly between"),  # t(1e9) rounds to 1.0 > T
    ([0.5, 1.4], "strictly decreasing"),
    ([1.4, 1.4], "strictly decreasing"),
    ([1e-9], "strictly between"),  # t(1e-9) is below eps_t = 0.006
    (["a"], "grid must be one of"),
])
def test_bad_grids_are_refused(grid, pattern):
    m = model()
    with pytest.raises((ValueError, TypeError), match=pattern):
        time_grid(m, 1, grid)
    with pytest.raises((ValueError, TypeError), match=pattern):
        imm_fast.sample(m, torch.randn(1, 2, 8, 8), grid=grid)


def test_explicit_grids_stay_within_eps_and_T():
    m = model()
    g = time_grid(m, 1, [20.0, 1.4, 0.1])
    assert g[0] == m.T and g[-1] == m.eps and bool((g[1:] < g[:-1]).all())


@pytest.mark.parametrize("labels,pattern", [
    (torch.tensor([0, 1, 2]), r"holds 3 ids .* batch of 2"),
    (torch.tensor([1]), r"holds 1 ids .* batch of 2"),
    (torch.tensor(1), r"holds 1 ids .* batch of 2"),
    (torch.zeros(2, 20), r"one-hot rows of shape \(2, label_dim=4\), got torch.float32 of shape \(2, 20\)"),
    (torch.zeros(4, 2), r"shape \(4, 2\)"),  # 8 values: would reshape to (2, 4) silently before
    (torch.zeros(2), r"shape \(2,\)"),  # float ids are not ids
    (torch.zeros(2, 4, 1), r"shape \(2, 4, 1\)"),
    (torch.tensor([True, False]), "integers"),
    (torch.tensor([0, 5]), r"ids in \[0, 4\]"),
])
def test_label_count_and_shape_are_checked(labels, pattern):
    m = model()
    with pytest.raises((ValueError, TypeError), match=pattern):
        imm_fast.sample(m, torch.randn(2, 2, 8, 8), class_labels=labels)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="N = 0"):
        imm_fast.sample(model(), torch.randn(0, 2, 8, 8))


def test_restart_with_one_generator_per_sample_does_not_depend_on_the_batch():
    """sample(generator=[g_0, ..., g_{N-1}]): the restart noise of row i comes from g_i alone (what evaluation's
    per-sample seeds pass in), so a sample is the same in any batch (up to the network's batch-size round-off)."""
    m = model()
    z = torch.randn(4, 2, 8, 8) * 0.5
    lab = torch.tensor([0, 1, 2, 3])
    gens = lambda rows: [torch.Generator().manual_seed(100 + i) for i in rows]  # noqa: E731
    whole = imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=gens(range(4)))
    for i in range(4):
        alone = imm_fast.sample(m, z[i:i + 1], steps=3, sampler="restart", class_labels=lab[i:i + 1],
                                generator=gens([i]))
        torch.testing.assert_close(alone[0], whole[i], rtol=1e-5, atol=1e-6)
    other = imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=gens(range(1, 5)))
    assert (other - whole).abs().max() > 1e-2  # the noise really comes from the generators
    with pytest.raises(TypeError, match="list of 4 CPU generators"):
        imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=gens(range(3)))
