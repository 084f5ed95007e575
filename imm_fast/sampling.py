"""Few-step IMM sampling (the IMM paper's Algorithm 2, pushforward and restart), numerically the authors'
generate_images.py.

The state between steps is kept in float64; network calls run in float32 (or the model's autocast).
Pushforward: x <- f(x, s = t_{i+1}, t = t_i) along the grid. Restart: x_hat = f(x, eps_t, t_i), then re-noise
to t_{i+1} with fresh noise. Grids: "uniform", "edm" (rho = 7 in eta) or a list of middle eta values.

On CUDA, sample() replays each step's network call from a CUDA graph (cuda_graph=None: auto). Per model and
key (shapes, dtypes, labels/guidance, autocast state) the first call runs eagerly on a side stream (the capture
warm-up), then one call is captured with static inputs (x, t, s, labels), replayed once on the same inputs and
compared bit for bit with the eager result; a capture error or any difference warns once and that key stays
eager for good. So a graph never changes a result: it only removes launch overhead.

Shapes: N images, (Cin, R, R) each.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from . import _backend
from . import schedule as sch
from .config import GRIDS, SAMPLERS, eta_grid_problem


def time_grid(model, steps, grid="uniform", device=None):
    """float64 times T = t_0 > ... > t_N = eps_t (N = steps, or len(middle etas) + 1 for an explicit list).

    grid: one of GRIDS, or middle eta values (finite, positive, strictly decreasing, each mapping to a time strictly
    between eps_t and T); anything else is a ValueError, so a grid never leaves [eps_t, T] or runs backwards.
    """
    T, eps, ns = model.T, model.eps, model.noise_schedule
    if isinstance(grid, str):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if grid not in GRIDS:
            raise ValueError(f"grid={grid!r} is not one of {GRIDS} (or a list of middle eta values)")
        if grid == "uniform":
            return torch.linspace(T, eps, steps + 1, dtype=torch.float64, device=device)
        if grid == "edm":
            eta_min, eta_max = sch.eta_bounds(eps, T, ns)
            rho = 7
            i = torch.arange(steps + 1, dtype=torch.float64, device=device)
            etas = (eta_max ** (1 / rho) + i / steps * (eta_min ** (1 / rho) - eta_max ** (1 / rho))) ** rho
            return sch.t_of_eta(etas, ns)
    try:
        mid = [float(v) for v in grid]
    except (TypeError, ValueError):
        raise TypeError(f"grid must be one of {GRIDS} or a list of middle eta values, got {grid!r}") from None
    problem = eta_grid_problem(mid)
    if problem:
        raise ValueError(f"grid={mid!r} {problem}")
    # As the authors: each eta goes through a default-dtype (float32) tensor before becoming a float64 time.
    mid_t = [sch.t_of_eta(torch.as_tensor(v), ns).item() for v in mid]
    ts = [T] + mid_t + [eps]
    if not all(a > b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"grid={mid!r} gives times {[round(v, 6) for v in mid_t]}: each must lie strictly between "
                         f"eps_t={eps} and T={T} and decrease (eta in ({sch.eta_bounds(eps, T, ns)[0]:.6g}, "
                         f"{sch.eta_bounds(eps, T, ns)[1]:.6g}))")
    return torch.tensor(ts, dtype=torch.float64, device=device)


def _eager_net(model, class_labels, cfg_scale):
    """net(x, t, s) = f(x, s, t): one plain network call."""
    return lambda x, t, s: model(x, t, s, class_labels=class_labels, cfg_scale=cfg_scale)


@torch.no_grad()
def pushforward(model, noise, t_steps, class_labels=None, cfg_scale=None):
    return _pushforward(_eager_net(model, class_labels, cfg_scale), noise, t_steps)


@torch.no_grad()
def restart(model, noise, t_steps, class_labels=None, cfg_scale=None, generator=None):
    return _restart(_eager_net(model, class_labels, cfg_scale), model, noise, t_steps, generator)


def _pushforward(net, noise, t_steps):
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = net(x, t_cur, t_next).to(torch.float64)
    return x


def _restart_noise(x, generator):
    """Fresh N(0, I) noise like x: torch.randn_like (the authors' order), one generator for the batch, or one
    generator per sample (row i from generator[i] on the CPU, so a sample does not depend on its batch)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    rows = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]
    return torch.stack(rows).to(x.device)


def _restart(net, model, noise, t_steps, generator=None):
    x = noise.to(torch.float64)
    t_steps = t_steps[:-1]
    for i, t_cur in enumerate(t_steps):
        x = net(x, t_cur, torch.ones_like(t_cur) * model.eps).to(torch.float64)
        if i < len(t_steps) - 1:
            alpha, sigma = sch.alpha_sigma(t_steps[i + 1], model.noise_schedule)
            x = alpha * x + sigma * (_restart_noise(x, generator) * model.sigma_data)
    return x


def _check_generator(generator, n):
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or len(generator) != n \
            or not all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in generator):
        raise TypeError(f"generator must be None, a torch.Generator or a list of {n} CPU generators (one per "
                        f"sample), got {type(generator).__name__}"
                        + (f" of length {len(generator)}" if isinstance(generator, (list, tuple)) else ""))


def sample(model, noise, steps=1, sampler="pushforward", grid="uniform", class_labels=None, cfg_scale=None,
           generator=None, cuda_graph=None):
    """Generate from prior noise x ~ N(0, sigma_d^2 I) of shape (N, Cin, R, R); returns the float64 sample.

    steps: network evaluations (x2 with guidance); ignored when grid is an explicit list of middle eta values.
    sampler: "pushforward" or "restart" (restart draws fresh noise with torch.randn_like, in the authors'
    order, or from `generator`: one torch.Generator, or a list of N CPU generators, sample i's noise from the
    i-th, so that a sample is a function of its own generator whatever the batch).
    class_labels: int ids (N,) with label_dim = null class, or one-hot rows.
    cfg_scale: classifier-free guidance weight w (G = G_u + w (G_c - G_u)), None = off.
    The model is used as it is: call model.eval() first for deterministic sampling.
    cuda_graph: None (auto: on for CUDA noise when every submodule is in eval mode), True (CUDA noise and an eval
    model required, else ValueError) or False. Results are bitwise those of the eager loop (see the module
    docstring); graphs see parameters by address, so in-place updates (load_state_dict, optimizer steps) are
    picked up, and replacing parameters starts new graphs. clear_graph_cache() frees their memory.
    """
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph={cuda_graph!r} is not one of (None, True, False)")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2:
        raise ValueError(f"noise must be a (N, C, H, W) tensor, got {type(noise).__name__} "
                         f"{tuple(getattr(noise, 'shape', ()))}")
    expected = (model.img_channels, model.img_resolution, model.img_resolution)
    if tuple(noise.shape[1:]) != expected:
        raise ValueError(f"noise must have shape (N, {', '.join(map(str, expected))}), got {tuple(noise.shape)}")
    if noise.shape[0] == 0:
        raise ValueError("noise holds no samples (N = 0): ask for at least one image")
    _check_generator(generator, noise.shape[0])
    if cfg_scale is not None and model.label_dim == 0:
        raise ValueError("cfg_scale needs a class-conditional model (label_dim > 0)")
    use_graph = _use_graph(model, noise, cfg_scale, cuda_graph)
    t_steps = time_grid(model, steps, grid, noise.device)
    if not use_graph:
        if sampler == "pushforward":
            return pushforward(model, noise, t_steps, class_labels, cfg_scale)
        return restart(model, noise, t_steps, class_labels, cfg_scale, generator)
    with torch.no_grad():
        net = _graph_net(model, noise, class_labels, cfg_scale)
        if sampler == "pushforward":
            return _pushforward(net, noise, t_steps)
        return _restart(net, model, noise, t_steps, generator)


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs of one network call

_GRAPHS = weakref.WeakKeyDictionary()  # model -> _ModelGraphs (dies with the model)
_MISSING = object()
_SIDE_STREAMS = {}  # device -> the stream that warms up and captures


class _ModelGraphs:
    def __init__(self, signature):
        self.signature = signature  # parameter/buffer addresses the graphs read
        self.entries = {}  # key -> _CapturedCall, or None = eager for good


class _CapturedCall:
    """A captured f(x, t, s | labels): copy the inputs into the static tensors, replay, clone the output."""

    def __init__(self, graph, static_in, static_out):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out

    def __call__(self, *inputs):
        for dst, src in zip(self.static_in, inputs):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites static_out


def clear_graph_cache(model=None):
    """Drop the captured graphs (and their memory pools) of one model, or of all models."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(model, None)


def graph_cache_info(model):
    """{"graphs": keys replayed from a CUDA graph, "eager": keys that fell back to eager} for this model."""
    cache = _GRAPHS.get(model)
    entries = list(cache.entries.values()) if cache is not None else []
    return {"graphs": sum(e is not None for e in entries), "eager": sum(e is None for e in entries)}


def _use_graph(model, noise, cfg_scale, cuda_graph):
    if cuda_graph is False:
        return False
    if not noise.is_cuda:
        if cuda_graph:
            raise ValueError(f"cuda_graph=True needs CUDA tensors, but noise is on {noise.device}; "
                             "use cuda_graph=None (auto) or False")
        return False
    if any(m.training for m in model.modules()):
        if cuda_graph:
            raise ValueError("cuda_graph=True needs the model in eval mode (a graph would freeze dropout and "
                             "label-dropout draws); call model.eval() or pass cuda_graph=False")
        return False
    if cfg_scale is not None and not isinstance(cfg_scale, (int, float)):
        if cuda_graph:
            raise ValueError(f"cuda_graph=True needs cfg_scale as a Python number, got {type(cfg_scale).__name__}")
        return False  # a tensor scale would be frozen into the graph by address
    if torch.is_autocast_enabled("cuda"):
        if cuda_graph:
            raise ValueError("cuda_graph=True cannot run inside an enclosing torch.autocast region (its weight-cast "
                             "cache would outlive the capture); set the model's mixed_precision instead")
        return False
    return True


def _signature(model):
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in itertools.chain(model.parameters(), model.buffers()))


def _key(model, x, t, s, labels, cfg_scale):
    """Everything a captured call bakes in besides the parameters: shapes, dtypes, guidance, autocast, and the
    IMM/DiT switches that select code paths (fused, mixed precision)."""
    inner = getattr(model, "model", None)
    meta = lambda v: None if v is None else (tuple(v.shape), v.dtype, v.device)  # noqa: E731
    return (meta(x), meta(t), meta(s), meta(labels), cfg_scale,
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            getattr(inner, "fused", None), getattr(model, "use_mixed_precision", None),
            getattr(model, "mixed_precision", None))


def _graph_net(model, noise, class_labels, cfg_scale):
    """net(x, t, s) for one sample() call: a graph replay per key, or the eager call where capture is not safe."""
    # Labels become float rows once, outside the graph: validating integer ids reads them on the host.
    labels = class_labels
    if hasattr(model, "prepare_labels"):
        labels = model.prepare_labels(class_labels, noise.shape[0], noise.device)
    sig = _signature(model)
    cache = _GRAPHS.get(model)
    if cache is None or cache.signature != sig:  # new or replaced parameters: the old graphs read stale memory
        cache = _GRAPHS[model] = _ModelGraphs(sig)

    def net(x, t, s):
        key = _key(model, x, t, s, labels, cfg_scale)
        entry = cache.entries.get(key, _MISSING)
        if entry is _MISSING:
            y, entry = _capture(model, x, t, s, labels, cfg_scale, key)
            cache.entries[key] = entry
            return y
        if entry is None:
            return model(x, t, s, class_labels=labels, cfg_scale=cfg_scale)
        return entry(x, t, s, labels)

    return net


def _same_bits(a, b):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}.get(a.element_size())
    if as_int is None or a.is_complex():
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.view(as_int), b.view(as_int)))  # NaNs compare by their bits too


def _capture(model, x, t, s, labels, cfg_scale, key):
    """(the eager result, a _CapturedCall or None). The eager call is also the warm-up (lazy inits, Triton
    compilation and autotuning, cuBLAS workspaces) and runs on a side stream, as capture requires."""
    run = lambda *v: model(v[0], v[1], v[2], class_labels=v[3], cfg_scale=cfg_scale)  # noqa: E731
    inputs = (x, t, s, labels)
    with torch.cuda.device(x.device):
        cur = torch.cuda.current_stream()
        # One side stream per device for warm-up and capture alike: per-stream lazy state (cuBLAS/cuDNN
        # workspaces) is then created by the warm-up, not in the middle of the capture.
        side = _SIDE_STREAMS.get(x.device)
        if side is None:
            side = _SIDE_STREAMS[x.device] = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            y = run(*inputs)
        cur.wait_stream(side)
        if isinstance(y, torch.Tensor):
            y.record_stream(cur)  # allocated on the side stream, used on this one
        try:
            static_in = [v.clone() if isinstance(v, torch.Tensor) else None for v in inputs]
            if any(v is not None and w is None for v, w in zip(inputs, static_in)):
                raise TypeError("labels that are not a tensor cannot be graph inputs")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                static_out = run(*static_in)
            graph.replay()
            same = _same_bits(static_out, y)
            reason = "its replay differs from the eager call"
        except Exception as e:  # noqa: BLE001 - any failure means: stay eager
            same, reason = False, f"capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            # torch.cuda.graph.__exit__ skips restoring the stream when ending the capture raises: restore it here.
            torch.cuda.set_stream(cur)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
    if not same:
        _backend.warn_once(f"sample-cuda-graph-{id(model)}-{key}",
                           f"imm_fast.sample: no CUDA graph for {type(model).__name__} with x {tuple(x.shape)}: "
                           f"{reason}; this shape runs eagerly (results are unaffected)")
        return y, None
    return y, _CapturedCall(graph, static_in, static_out)
