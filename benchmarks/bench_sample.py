"""Benchmarks of few-step IMM sampling: imm_fast.sample (pushforward, uniform grid, guidance 1.5) on DiT-XL/2
latents, in images/s; the VAE decode is timed apart.

Shapes: N images of latents (4, 32, 32), 1000 classes; each step is one network call on 2N rows (guidance).
The DiT-XL/2 has random weights (its zero-initialized adaLN and output layers filled too: never time on zeros)
and runs under the IMM wrapper's bf16 autocast, as the authors' sampler does. CPU tier: a tiny DiT.
Providers:
  reference     fused=False DiT, cuda_graph=False (the eager reference loop)
  fused         fused=True DiT, cuda_graph=False
  fused+graph   fused=True DiT, cuda_graph=True (each step replays a captured CUDA graph; extra_info
                graph_used says whether capture succeeded, else the eager fallback was timed)
extra_info: images_per_s (N / seconds per sample() call), steps, nfe (network calls; each on 2N rows), batch,
peak_mem_gb (GiB above what was allocated before the timed calls: the model and its graphs are excluded).
VAE decode (sd-vae-ft-ema architecture, random weights): needs diffusers, else it skips with a message.

UNet (test_sample_unet_*): the cifar10 preset's DDPM++ (random weights), unconditional RGB 32x32, 1 step and the
paper's 2-step grid (middle eta 1.4), under the wrapper's bf16 autocast with channels_last on CUDA. Providers: eager
(cuda_graph=False) and graph (cuda_graph=True). GPU batches 128 and 512; CPU: a narrow two-level copy, batch 8.

    pytest benchmarks/bench_sample.py -k cpu                     # CPU tier (runs here, torch's threads)
    IMM_FAST_BENCH_QUICK=1 pytest benchmarks/bench_sample.py -k gpu   # on a CUDA machine: batch 64 only

Ratio tests (test_sample_*_ratio, benchmarks/ratio_gate.py): the providers interleaved, their speed-ups over
the reference gated against a stored baseline (--ratio-baseline).
"""
from __future__ import annotations

import functools
import gc
import os

import pytest
import torch

import dataclasses

from imm_fast.config import PRESETS, ModelConfig, dit_config
from imm_fast.models import build_model
from imm_fast.sampling import clear_graph_cache, graph_cache_info, sample

CUDA = torch.cuda.is_available()
QUICK = os.environ.get("IMM_FAST_BENCH_QUICK", "0") == "1"
PROVIDERS = ("reference", "fused", "fused+graph")
STEPS = (1, 2, 4, 8)
CFG_SCALE = 1.5
GPU_BATCHES = (64,) if QUICK else (64, 256)
CPU_BATCH = 16
CPU_STEPS = (1, 4)
UNET_PROVIDERS = ("eager", "graph")
UNET_GRIDS = {1: "uniform", 2: (1.4,)}  # the paper's CIFAR-10 samplers
UNET_GPU_BATCHES = (128, 512)


def model_config(name, device):
    mp = "bf16" if device == "cuda" else None
    if name == "tiny":
        return ModelConfig(img_resolution=8, img_channels=4, label_dim=10, hidden_size=64, depth=2, num_heads=2,
                           mixed_precision=mp)
    return dit_config(name, img_resolution=32, img_channels=4, label_dim=1000, mixed_precision=mp)


@functools.lru_cache(maxsize=2)
def get_model(name, device, seed=0):
    """One eval-mode model per (size, device), shared by the providers (they switch model.model.fused)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(model_config(name, device))
        with torch.no_grad():
            for block in list(model.model.blocks) + [model.model.final_layer]:
                block.adaLN_modulation[-1].weight.normal_(0, 0.02)
            model.model.final_layer.linear.weight.normal_(0, 0.02)
    return model.eval()


@functools.lru_cache(maxsize=2)
def get_unet(name, device, seed=0):
    """The cifar10 preset's DDPM++ ("ddpmpp") or a narrow copy ("ddpmpp-tiny"), eval mode, on the device."""
    cfg = PRESETS["cifar10"].model
    if name == "ddpmpp-tiny":
        cfg = dataclasses.replace(cfg, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    cfg = dataclasses.replace(cfg, mixed_precision="bf16" if device == "cuda" else None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(cfg)
    return model.to(device).eval()  # .to(): channels_last conv weights on CUDA


def run_unet_bench(benchmark, name, batch, steps, provider, device, rounds):
    if provider not in UNET_PROVIDERS:
        raise ValueError(f"provider={provider!r} is not one of {UNET_PROVIDERS}")
    model = get_unet(name, device)
    grid = UNET_GRIDS[steps]
    noise = torch.randn(batch, 3, 32, 32, device=device, generator=torch.Generator(device=device).manual_seed(0))
    noise = noise * model.sigma_data  # (N, 3, 32, 32)

    def step():
        out = sample(model, noise, steps=steps, grid=grid, cuda_graph=provider == "graph")
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"sample-{name}-b{batch}-steps{steps}"
    if not benchmark.disabled:
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.disabled:
        assert out.shape[0] == batch and bool(torch.isfinite(out).all()), f"{provider}: non-finite sample"
        return
    t = benchmark.stats.stats.mean
    benchmark.extra_info.update(model=name, provider=provider, batch=batch, steps=steps, nfe=steps,
                                grid=str(grid), images_per_s=batch / t, threads=torch.get_num_threads())
    if provider == "graph":
        benchmark.extra_info["graph_used"] = graph_cache_info(model)["graphs"] > 0
    if device == "cuda":
        benchmark.extra_info["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """Free the shared models and their graphs after this file, before other benchmark files measure memory."""
    yield
    clear_graph_cache()
    get_model.cache_clear()
    get_unet.cache_clear()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def make_sample_step(model, batch, steps, provider, device, cfg_scale=CFG_SCALE, seed=0):
    """step() -> the (N, Cin, R, R) float64 sample of one sample() call (synchronized on CUDA)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r} is not one of {PROVIDERS}")
    if provider == "fused+graph" and device != "cuda":
        raise ValueError("provider 'fused+graph' needs CUDA")
    fused = provider != "reference"
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, device=device, generator=gen) * model.sigma_data  # (N, Cin, R, R)
    labels = torch.randint(0, model.label_dim, (batch,), device=device, generator=gen)  # (N,) class ids

    def step():
        model.model.fused = fused  # the providers share one model
        out = sample(model, noise, steps=steps, class_labels=labels, cfg_scale=cfg_scale,
                     cuda_graph=provider == "fused+graph")
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return step


def run_bench(benchmark, name, batch, steps, provider, device, rounds):
    model = get_model(name, device)
    step = make_sample_step(model, batch, steps, provider, device)
    benchmark.group = f"sample-{name.replace('/', '')}-b{batch}-steps{steps}-cfg{CFG_SCALE}"
    if not benchmark.disabled:
        step()  # warm-up: Triton compile/autotune, graph capture
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.disabled:  # --benchmark-disable (CI): one call ran; check it, record nothing
        assert out.shape[0] == batch and bool(torch.isfinite(out).all()), f"{provider}: non-finite sample"
        return
    t = benchmark.stats.stats.mean
    benchmark.extra_info.update(model=name, provider=provider, batch=batch, steps=steps, nfe=steps,
                                cfg_scale=CFG_SCALE, images_per_s=batch / t, threads=torch.get_num_threads())
    if provider == "fused+graph":
        benchmark.extra_info["graph_used"] = graph_cache_info(model)["graphs"] > 0
    if device == "cuda":
        benchmark.extra_info["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30


@pytest.mark.parametrize("steps", CPU_STEPS)
@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_sample_cpu(benchmark, provider, steps):
    run_bench(benchmark, "tiny", CPU_BATCH, steps, provider, "cpu", rounds=3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", GPU_BATCHES, ids=lambda b: f"b{b}")
def test_sample_gpu(benchmark, batch, provider, steps):
    run_bench(benchmark, "XL/2", batch, steps, provider, "cuda", rounds=3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", GPU_BATCHES, ids=lambda b: f"b{b}")
def test_vae_decode_gpu(benchmark, batch):
    """The SD VAE decoder (sd-vae-ft-ema's architecture, random weights: the timing does not depend on them)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        pytest.skip("diffusers is not installed: the VAE decode is not timed")
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).cuda().eval()
    z = torch.randn(batch, 4, 32, 32, device="cuda")  # (N, 4, 32, 32) latents

    def step():
        with torch.no_grad():
            vae.decode(z).sample
        torch.cuda.synchronize()

    step()
    benchmark.group = f"vae_decode-b{batch}"
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    if benchmark.disabled:
        return
    benchmark.extra_info.update(provider="reference", batch=batch, images_per_s=batch / benchmark.stats.stats.mean)


@pytest.mark.parametrize("steps", (1, 2))
def test_sample_unet_cpu(benchmark, steps):
    run_unet_bench(benchmark, "ddpmpp-tiny", 8, steps, "eager", "cpu", rounds=3)


def ratio_providers(name, batch, steps, providers, device):
    """{provider: step} of one ratio case (the recipe --ratio-against rebuilds with another commit's code)."""
    model = get_model(name, device)
    return {p: make_sample_step(model, batch, steps, p, device) for p in providers}


def run_ratio(ratio_bench, name, batch, steps, providers, device, rounds):
    kw = dict(name=name, batch=batch, steps=steps, providers=list(providers), device=device)
    ratio_bench(f"sample-{name.replace('/', '')}-b{batch}-steps{steps}-cfg{CFG_SCALE}", ratio_providers(**kw),
                baselines=("reference",), rounds=rounds, warmup=1, device=device,
                recipe=(__file__, "ratio_providers", kw))


def test_sample_cpu_ratio(ratio_bench):
    run_ratio(ratio_bench, "tiny", CPU_BATCH, CPU_STEPS[-1], ("reference", "fused"), "cpu", rounds=20)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("steps", (1, 2))
@pytest.mark.parametrize("provider", UNET_PROVIDERS)
@pytest.mark.parametrize("batch", UNET_GPU_BATCHES, ids=lambda b: f"b{b}")
def test_sample_unet_gpu(benchmark, batch, provider, steps):
    run_unet_bench(benchmark, "ddpmpp", batch, steps, provider, "cuda", rounds=3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", GPU_BATCHES[:1], ids=lambda b: f"b{b}")
def test_sample_gpu_ratio(ratio_bench, batch):
    run_ratio(ratio_bench, "XL/2", batch, STEPS[-1], PROVIDERS, "cuda", rounds=10)
