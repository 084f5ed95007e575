"""Benchmarks of one full IMM training step: imm_loss (no-grad target pass + student pass + MMD) + backward +
AdamW step + zero_grad, under bf16 autocast on CUDA.

Shapes: B batch = G groups x M particles (M = 4), latents (4, 32, 32) with 1000 classes (one-hot rows, as the
authors' data pipeline feeds them); DiT-S/2, B/2 and XL/2. CPU tier: a tiny DiT (hidden 64, depth 2, res 8).
Providers:
  reference          fused=False DiT, LossConfig(backend="torch") (mmd_loss_ref), eager
  reference+compile  the same with the DiT compiled (see IMM_FAST_BENCH_COMPILE)
  fused              fused=True DiT (adaLN + attention ops), LossConfig(backend=None) (auto MMD kernels), eager
  fused+compile      the same with the DiT compiled
extra_info: samples_per_s, peak_mem_gb (GiB, torch.cuda.max_memory_allocated from the model's construction to
the last timed step, less what earlier tests left allocated: parameters, gradients, AdamW states, activations),
model, batch, provider, params_m, compile_mode, tf32 (matmul TF32 as left by torch: off).

Environment:
  IMM_FAST_BENCH_QUICK=1          GPU matrix = S/2 b256 + XL/2 b64 and b128 (the device-run budget)
  IMM_FAST_BENCH_COMPILE=regional (default) compile per block: the reference compiles each DiTBlock; the fused
                                  path calls each block's adaLN_modulation, attn and mlp itself, so those are
                                  compiled (the adaLN boundary ops between them stay eager). Every block shares one
                                  compiled graph, so cold compile stays within the device budget.
  IMM_FAST_BENCH_COMPILE=full     compile the whole DiT (model.model.compile()); minutes of compile for XL/2.
  IMM_FAST_BENCH_COMPILE=off      skip the +compile providers (the cheapest device run).
XL/2 at b128/b256 may not fit with fp32 AdamW states; such cases skip with the OOM message.

UNet (the paper's CIFAR-10 DDPM++, tests in test_train_step_unet_*): RGB 32x32, unconditional, the cifar10 preset's
loss (simple_edm, identity, k = 15, a = 1, b = 5, M = 4), dropout 0.2, channels_last + bf16 autocast on CUDA.
Providers: eager (the UNet as is) and compile (compile_regions(IMM_FAST_BENCH_COMPILE): every UNetBlock), both with
the auto MMD backend. GPU: DDPM++ (55.7M + s embedding) at batch 128 / 256 / 512; CPU: width 16, two levels, b8.

    pytest benchmarks/bench_train_step.py -k cpu                    # CPU tier (runs here, torch's threads)
    IMM_FAST_BENCH_QUICK=1 pytest benchmarks/bench_train_step.py -k gpu  # on a CUDA machine

Ratio tests (test_train_step_*_ratio, benchmarks/ratio_gate.py): reference and fused (eager) interleaved, the
fused speed-up gated against a stored baseline (--ratio-baseline).
"""
from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch
import torch.nn.functional as F

import dataclasses

from imm_fast.config import PRESETS, LossConfig, ModelConfig, dit_config
from imm_fast.loss import imm_loss
from imm_fast.models import build_model

CUDA = torch.cuda.is_available()
QUICK = os.environ.get("IMM_FAST_BENCH_QUICK", "0") == "1"
COMPILE_MODE = os.environ.get("IMM_FAST_BENCH_COMPILE", "regional")
PROVIDERS = ("reference", "reference+compile", "fused", "fused+compile")
M = 4  # particles per group
LABEL_DIM = 1000
GPU_CASES = ([("S/2", 256), ("XL/2", 64), ("XL/2", 128)] if QUICK else
             [(m, b) for m in ("S/2", "B/2", "XL/2") for b in (64, 128, 256)])
CPU_CASES = [("tiny", 16)]
UNET_PROVIDERS = ("eager", "compile")
UNET_GPU_CASES = [("ddpmpp", 128), ("ddpmpp", 512)] if QUICK else [("ddpmpp", b) for b in (128, 256, 512)]
UNET_CPU_CASES = [("ddpmpp-tiny", 8)]


def model_config(name, provider, device):
    """ModelConfig for a named size ("S/2", ..., or "tiny") and provider; bf16 autocast on CUDA."""
    fused = provider.startswith("fused")
    mp = "bf16" if device == "cuda" else None
    if name == "tiny":
        return ModelConfig(img_resolution=8, img_channels=4, label_dim=10, hidden_size=64, depth=2, num_heads=2,
                           mixed_precision=mp, fused=fused)
    return dit_config(name, img_resolution=32, img_channels=4, label_dim=LABEL_DIM, mixed_precision=mp, fused=fused)


def compile_dit(dit, fused, mode=COMPILE_MODE):
    """Compile the DiT in place (keeps parameter names): per block ("regional") or whole ("full")."""
    if mode not in ("regional", "full"):
        raise ValueError(f"IMM_FAST_BENCH_COMPILE={mode!r} is not one of ('regional', 'full', 'off') "
                         "(off skips the compiled providers)")
    assert dit.fused is None or bool(dit.fused) == fused
    dit.compile_regions(mode)


def make_train_step(name, batch, provider, device, seed=0):
    """(step, model, info): step() runs one full training step and synchronizes on CUDA."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r} is not one of {PROVIDERS}")
    fused = provider.startswith("fused")
    cfg = model_config(name, provider, device)
    torch.manual_seed(seed)
    with torch.device(device):  # initialize on the device: XL/2 on the CPU would take seconds
        model = build_model(cfg)
    model.train()
    loss_cfg = LossConfig(group_size=M, backend=None if fused else "torch")
    # The reference must not reach a kernel: explicit "torch" backends beat IMM_FAST_BACKEND.
    assert model.model.fused is fused and (fused or loss_cfg.backend == "torch")
    if provider.endswith("+compile"):
        compile_dit(model.model, fused)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, device=device,
                    generator=gen) * cfg.sigma_data  # (B, Cin, R, R)
    ids = torch.randint(0, cfg.label_dim, (batch,), device=device, generator=gen)
    labels = F.one_hot(ids, cfg.label_dim).float()  # (B, label_dim)
    step = _step_fn(model, opt, x, labels, loss_cfg, device)
    info = dict(model=name, batch=batch, provider=provider, M=M, params_m=sum(p.numel() for p in model.parameters())
                / 1e6, compile_mode=COMPILE_MODE if provider.endswith("+compile") else "none")
    return step, model, info


def _step_fn(model, opt, x, labels, loss_cfg, device):
    """One optimizer step of the IMM objective on fixed inputs (bf16 autocast on CUDA), synchronized."""
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext

    def step():
        with autocast():
            out = imm_loss(model, x, labels, loss_cfg)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out.loss.detach()

    return step


def unet_config(name, device):
    """The cifar10 preset's DDPM++ ("ddpmpp") or a narrow two-level copy ("ddpmpp-tiny"); bf16 autocast on CUDA."""
    cfg = PRESETS["cifar10"].model
    if name == "ddpmpp-tiny":
        cfg = dataclasses.replace(cfg, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    elif name != "ddpmpp":
        raise ValueError(f"UNet bench name={name!r} is not one of ('ddpmpp', 'ddpmpp-tiny')")
    return dataclasses.replace(cfg, mixed_precision="bf16" if device == "cuda" else None)


def make_unet_train_step(name, batch, provider, device, seed=0):
    """(step, model, info) for the DDPM++ UNet: the cifar10 preset's loss, unconditional, no labels."""
    if provider not in UNET_PROVIDERS:
        raise ValueError(f"provider={provider!r} is not one of {UNET_PROVIDERS}")
    cfg = unet_config(name, device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(cfg)
    model.to(device).train()  # .to(): conv weights become channels_last on CUDA
    if provider == "compile":
        model.model.compile_regions(COMPILE_MODE)
    loss_cfg = dataclasses.replace(PRESETS["cifar10"].loss, group_size=M)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=gen) * cfg.sigma_data  # (B, 3, 32, 32)
    step = _step_fn(model, opt, x, None, loss_cfg, device)
    info = dict(model=name, batch=batch, provider=provider, M=M, params_m=sum(p.numel() for p in model.parameters())
                / 1e6, compile_mode=COMPILE_MODE if provider == "compile" else "none")
    return step, model, info


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_bench(benchmark, name, batch, provider, device, rounds, warmup_steps):
    benchmark.group = f"train_step-{name.replace('/', '')}-b{batch}"
    if provider.endswith("compile"):
        torch._dynamo.reset()  # fresh compile caches per case: no recompile-limit fallbacks across cases
    _free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # left by earlier tests, not this step's
    oom = None
    compiled = provider.endswith("compile")
    try:
        make = make_unet_train_step if name.startswith("ddpmpp") else make_train_step
        step, model, info = make(name, batch, provider, device)
        for _ in range(0 if benchmark.disabled else warmup_steps):  # AdamW states, Triton autotune, compile
            step()
        loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    except Exception as e:  # noqa: BLE001 - OOM may also come wrapped by torch.compile
        if "out of memory" not in str(e).lower():
            raise
        oom = str(e).strip().splitlines()[0][:200]
    if oom is not None:  # skip outside the except block, so the traceback's frames (and their tensors) are freed
        step = model = None
        torch._dynamo.reset()
        _free(device)
        pytest.skip(f"{name} b{batch} {provider}: out of memory ({oom})")
    if benchmark.disabled:  # --benchmark-disable (CI): one step ran; check it, record nothing
        assert loss is not None and bool(torch.isfinite(loss)), f"{name} {provider}: loss {loss}"
        return
    t = benchmark.stats.stats.mean
    info.update(samples_per_s=batch / t, tf32=torch.backends.cuda.matmul.allow_tf32,
                threads=torch.get_num_threads())
    if device == "cuda":
        info["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    benchmark.extra_info.update(info)
    del step, model
    if compiled:
        torch._dynamo.reset()  # compiled code keeps references to this model's modules
    _free(device)


@pytest.mark.parametrize("provider", ["reference", "fused"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_step_cpu(benchmark, case, provider):
    run_bench(benchmark, case[0], case[1], provider, "cpu", rounds=3, warmup_steps=1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0].replace('/', '')}-b{c[1]}")
def test_train_step_gpu(benchmark, case, provider):
    name, batch = case
    big = name == "XL/2"
    compiled = provider.endswith("+compile")
    if compiled and COMPILE_MODE == "off":
        pytest.skip("IMM_FAST_BENCH_COMPILE=off")
    run_bench(benchmark, name, batch, provider, "cuda", rounds=3 if big else 5, warmup_steps=2 if compiled else 1)


@pytest.mark.parametrize("case", UNET_CPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_step_unet_cpu(benchmark, case):
    run_bench(benchmark, case[0], case[1], "eager", "cpu", rounds=3, warmup_steps=1)


def ratio_providers(name, batch, device, providers):
    """{provider: step} of one ratio case (the recipe --ratio-against rebuilds with another commit's code)."""
    return {p: make_train_step(name, batch, p, device)[0] for p in providers}


def run_ratio(ratio_bench, name, batch, device, rounds, providers=("reference", "fused")):
    """The eager providers interleaved (both models alive at once); +compile stays out of the gate (compile time)."""
    _free(device)
    try:
        kw = dict(name=name, batch=batch, device=device, providers=list(providers))
        ratio_bench(f"train_step-{name.replace('/', '')}-b{batch}", ratio_providers(**kw), baselines=("reference",),
                    rounds=rounds, warmup=2, device=device, recipe=(__file__, "ratio_providers", kw))
    except torch.OutOfMemoryError as e:
        oom = str(e).strip().splitlines()[0][:200]
    else:
        oom = None
    _free(device)
    if oom is not None:
        pytest.skip(f"{name} b{batch}: out of memory with {len(providers)} models ({oom})")


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_step_cpu_ratio(ratio_bench, case):
    run_ratio(ratio_bench, case[0], case[1], "cpu", rounds=20)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("provider", UNET_PROVIDERS)
@pytest.mark.parametrize("case", UNET_GPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_step_unet_gpu(benchmark, case, provider):
    if provider == "compile" and COMPILE_MODE == "off":
        pytest.skip("IMM_FAST_BENCH_COMPILE=off")
    run_bench(benchmark, case[0], case[1], provider, "cuda", rounds=5, warmup_steps=2 if provider == "compile" else 1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0].replace('/', '')}-b{c[1]}")
def test_train_step_gpu_ratio(ratio_bench, case):
    run_ratio(ratio_bench, case[0], case[1], "cuda", rounds=10)
