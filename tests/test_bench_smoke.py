"""CI smoke tests of the end-to-end benchmarks (benchmarks/bench_train_step.py, bench_sample.py,
profile_train_step.py) on their CPU shapes, and of sample()'s cuda_graph switch.

The benchmark step builders run once with a tiny DiT (hidden 64, depth 2, res 8): the providers must compute
the same loss / samples, and a training step must move the parameters. The benchmark files themselves run
through pytest with --benchmark-disable (one untimed call each). GPU tests (marked gpu) check that graph replays
are bitwise the eager loop; they skip without CUDA.
Shapes: N images (Cin, R, R); B batch = G groups x M particles.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import imm_fast
from imm_fast.models import build_model
from imm_fast.sampling import clear_graph_cache, graph_cache_info

from _helpers import random_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CUDA = torch.cuda.is_available()
pytest_plugins = ["pytester"]


def _load(name):
    """Import benchmarks/<name>.py (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_imm_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # profile_train_step imports bench_train_step by name
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def bench_train():
    return _load("bench_train_step")


@pytest.fixture(scope="module")
def bench_sample():
    return _load("bench_sample")


# ---------------------------------------------------------------------------------------------------------------
# Training step


def test_train_step_providers_agree_and_train(bench_train):
    losses = {}
    for provider in ("reference", "fused"):
        step, model, info = bench_train.make_train_step("tiny", 8, provider, "cpu", seed=3)
        assert model.model.fused is (provider == "fused") and info["provider"] == provider
        before = [p.detach().clone() for p in model.parameters()]
        losses[provider] = step()
        moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
        assert any(moved), f"{provider}: AdamW step left every parameter unchanged"
        assert torch.isfinite(losses[provider]) and losses[provider] > 0
    # Same seed -> same weights, times, noise and labels: the providers differ only in kernels.
    torch.testing.assert_close(losses["fused"], losses["reference"], rtol=1e-4, atol=1e-6)


def test_train_step_bad_provider(bench_train):
    with pytest.raises(ValueError, match="provider"):
        bench_train.make_train_step("tiny", 8, "triton", "cpu")
    with pytest.raises(ValueError, match="IMM_FAST_BENCH_COMPILE"):
        bench_train.compile_dit(build_model(bench_train.model_config("tiny", "reference", "cpu")).model, False,
                                mode="everything")


# ---------------------------------------------------------------------------------------------------------------
# Sampling benchmark


def test_sample_step_providers_agree(bench_sample):
    model = bench_sample.get_model("tiny", "cpu")
    out = {p: bench_sample.make_sample_step(model, 4, 2, p, "cpu")() for p in ("reference", "fused")}
    assert out["reference"].shape == (4, 4, 8, 8) and out["reference"].dtype == torch.float64
    assert bool(torch.isfinite(out["reference"]).all())
    torch.testing.assert_close(out["fused"], out["reference"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs CUDA"):
        bench_sample.make_sample_step(model, 4, 2, "fused+graph", "cpu")


def test_benchmark_files_cpu_tier_run():
    """The CPU tier of both benchmark files (per-provider and ratio tests), untimed, through pytest-benchmark as CI
    would run it; the ratio gate's options parse and nothing is saved."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("IMM_FAST_BENCH_INJECT", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "cpu",
                        "--benchmark-disable", "--ratio-fail", "20%", str(BENCH / "bench_train_step.py"),
                        str(BENCH / "bench_sample.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [line.split()[1] for line in r.stdout.splitlines() if "::test_" in line and "%]" in line]
    assert results and set(results) == {"PASSED"}, r.stdout[-3000:]  # nothing skipped
    assert "test_train_step_cpu_ratio" in r.stdout and "test_sample_cpu_ratio" in r.stdout
    assert "test_train_step_unet_cpu" in r.stdout and "test_sample_unet_cpu" in r.stdout  # the DDPM++ UNet cases


def test_profile_script(bench_train, capsys):
    prof = _load("profile_train_step")
    if not CUDA:
        assert prof.main([]) == 0
        assert "no CUDA device" in capsys.readouterr().out
    table, seconds = prof.profile_step("tiny", 8, "fused", "cpu", row_limit=5, warmup=1)
    assert seconds > 0 and "aten::" in table and "Self CPU" in table


# ---------------------------------------------------------------------------------------------------------------
# sample(cuda_graph=...)


def _tiny(**kw):
    base = dict(img_resolution=8, img_channels=2, label_dim=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                eps=0.006)
    torch.manual_seed(0)
    return random_model(**{**base, **kw})


def test_cuda_graph_argument_checks():
    m = _tiny()
    z = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"cuda_graph=True needs CUDA tensors.*cpu"):
        imm_fast.sample(m, z, cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph='yes' is not one of"):
        imm_fast.sample(m, z, cuda_graph="yes")


def test_cuda_graph_auto_on_cpu_is_the_eager_loop():
    m = _tiny()
    z = torch.randn(3, 2, 8, 8) * 0.5
    lab = torch.tensor([0, 3, 4])
    x = z.double()
    for a, b in [(0.994, 0.5), (0.5, 0.006)]:  # the pushforward chain, by hand
        x = m(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), class_labels=lab,
              cfg_scale=1.5).double()
    auto = imm_fast.sample(m, z, steps=2, grid=[1.0], class_labels=lab, cfg_scale=1.5)
    off = imm_fast.sample(m, z, steps=2, grid=[1.0], class_labels=lab, cfg_scale=1.5, cuda_graph=False)
    torch.testing.assert_close(auto, x, rtol=0, atol=0)
    torch.testing.assert_close(off, x, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=g1),
                               imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=g2,
                                               cuda_graph=False), rtol=0, atol=0)
    assert graph_cache_info(m) == {"graphs": 0, "eager": 0}  # nothing captured, nothing cached on CPU


class _ToyIMM(nn.Module):
    """The sample() contract without a DiT: f = x - (t - s) * sigma_d * G(x, t, s), G a 1x1 convolution + tanh."""

    img_channels, img_resolution, label_dim = 2, 8, 0
    T, eps, noise_schedule, sigma_data = 0.994, 0.006, "fm", 0.5

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x, t, s, class_labels=None, cfg_scale=None):
        g = torch.tanh(self.conv(x.float()) + t.float() - s.float()).to(x.dtype)
        return x - (t - s) * self.sigma_data * g


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replays_bitwise_toy():
    m = _ToyIMM().cuda().eval()
    clear_graph_cache(m)
    for seed in (0, 1):  # seed 1: a replay on new inputs, through the static-input copies
        z = torch.randn(4, 2, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        ref = imm_fast.sample(m, z, steps=4, cuda_graph=False)
        got = imm_fast.sample(m, z, steps=4, cuda_graph=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert graph_cache_info(m) == {"graphs": 1, "eager": 0}
    with torch.no_grad():
        m.conv.weight.mul_(0.5)  # in place: the graph reads the new values
    torch.testing.assert_close(imm_fast.sample(m, z, steps=2, cuda_graph=True),
                               imm_fast.sample(m, z, steps=2, cuda_graph=False), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_auto_dit_is_bitwise_eager(fused):
    m = _tiny(mixed_precision="bf16", fused=fused).cuda()
    clear_graph_cache(m)
    for seed in (0, 1):
        gen = torch.Generator("cuda").manual_seed(seed)
        z = torch.randn(3, 2, 8, 8, device="cuda", generator=gen) * 0.5
        lab = torch.tensor([0, 3, 4], device="cuda")
        ref = imm_fast.sample(m, z, steps=3, class_labels=lab, cfg_scale=1.5, cuda_graph=False)
        got = imm_fast.sample(m, z, steps=3, class_labels=lab, cfg_scale=1.5)  # auto
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        g1, g2 = torch.Generator("cuda").manual_seed(9), torch.Generator("cuda").manual_seed(9)
        torch.testing.assert_close(imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=g1),
                                   imm_fast.sample(m, z, steps=3, sampler="restart", class_labels=lab, generator=g2,
                                                   cuda_graph=False), rtol=0, atol=0)
    info = graph_cache_info(m)
    assert info["graphs"] + info["eager"] >= 1  # each key was either captured or fell back (with a warning)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_never_in_training_mode():
    m = _tiny().cuda().train()
    z = torch.randn(2, 2, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="eval mode"):
        imm_fast.sample(m, z, cuda_graph=True)
    imm_fast.sample(m, z)  # auto: eager
    assert graph_cache_info(m) == {"graphs": 0, "eager": 0}


# ---------------------------------------------------------------------------------------------------------------
# Every benchmark case compiles from cold


COLD_CONFTEST = f"""
import importlib.util, sys
sys.path.insert(0, {str(BENCH)!r})
spec = importlib.util.spec_from_file_location("imm_bench_conftest", {str(BENCH / "conftest.py")!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
_cold_compiler = mod._cold_compiler
"""

COLD_TESTS = """
import torch
from torch._dynamo.utils import counters

SEEN = []


def f(x):
    return x.sin() * 2


def test_first_case():
    torch.compile(f, backend="eager")(torch.ones(3))
    SEEN.append(counters["stats"]["unique_graphs"])


def test_second_case_compiles_again():
    torch.compile(f, backend="eager")(torch.ones(3))  # same code, same input: a cache hit unless reset
    assert counters["stats"]["unique_graphs"] == SEEN[0] + 1
    cfg = torch._dynamo.config
    assert "fail_on_recompile_limit_hit" not in cfg._config or cfg.fail_on_recompile_limit_hit
"""


def test_each_benchmark_case_compiles_from_cold(pytester):
    """benchmarks/conftest.py resets dynamo before every case (no case inherits another's graphs or recompiles),
    and past the recompile limit dynamo raises rather than running "compile" eagerly."""
    pytester.makeconftest(COLD_CONFTEST)
    pytester.makepyfile(test_cold=COLD_TESTS)
    # a subprocess: an in-process run drops the torch modules it imported, which torch does not survive
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=600).assert_outcomes(passed=2)


def test_compiled_baselines_are_per_case():
    mmd, adaln, attn = _load("bench_mmd"), _load("bench_adaln"), _load("bench_attention")
    assert mmd._compiled_ref() is not mmd._compiled_ref()
    assert adaln._compiled("modulate") is not adaln._compiled("modulate")
    assert attn.compiled_ref() is not attn.compiled_ref()
