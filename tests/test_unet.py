"""SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM) backbones: shapes, the authors' parameter names, their
s-embedding wiring, checkpoint round trips (the authors' pickle format, safetensors, plain state dicts), the cifar10
preset (train, exact resume, sample with the paper's 2-step eta list) and the CUDA speed switches."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import imm_fast
from imm_fast.checkpoints import save_model
from imm_fast.config import PRESETS, ModelConfig
from imm_fast.models import IMM, build_model
from imm_fast.models.unet import DhariwalUNet, SongUNet

from _helpers import assert_load_refused
from _official_format import write_official_pickle

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions: one thread is fastest, and immune to oversubscribed CI cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)

# Narrow versions of the three architectures (32x32 RGB): the paper's CIFAR DDPM++ layout at width 16, NCSN++ and
# ADM with their distinctive switches.
DDPMPP = dict(model_type="SongUNet", img_resolution=32, img_channels=3, label_dim=0, model_channels=16,
              channel_mult=(2, 2, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.2, f_type="simple_edm",
              temb_type="identity", eps=0.006, T=0.994)
NCSNPP = dict(DDPMPP, img_resolution=16, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
              decoder_type="skip", resample_filter=(1, 3, 3, 1), label_dim=5, channel_mult=(1, 2),
              attn_resolutions=(8,), f_type="identity")
ADM = dict(DDPMPP, img_resolution=16, model_type="DhariwalUNet", model_channels=32, channel_mult=(1, 4),
           attn_resolutions=(8,), label_dim=10, f_type="euler_fm", temb_type="stride", eps=0.0, dropout=0.1)
VARIANTS = {"ddpmpp": DDPMPP, "ncsnpp": NCSNPP, "adm": ADM}


def random_unet(seed=0, **kw):
    """Eval-mode model with every weight perturbed (the near-zero output convs would hide the network)."""
    torch.manual_seed(seed)
    m = build_model(ModelConfig(**kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def inputs(m, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m.img_channels, m.img_resolution, m.img_resolution, generator=g, dtype=torch.float64) * 0.5
    labels = torch.tensor([0, 2, m.label_dim][:n]) if m.label_dim else None
    return x, torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64), labels


def assert_same_outputs(a, b):
    x, t, s, labels = inputs(a)
    torch.testing.assert_close(b(x, t, s, class_labels=labels), a(x, t, s, class_labels=labels), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------
def test_cifar10_ddpmpp_has_the_authors_layout_and_size():
    """The full-width cifar10 preset model: the authors' parameter names (sampled) and EDM's DDPM++ size
    (55.73M) plus the s embedding (map_layer0_s 128x512 + map_layer1_s 512x512, with biases)."""
    with torch.device("meta"):  # shapes only: no 56M-parameter initialization
        m = build_model(PRESETS["cifar10"].model)
    sd = m.state_dict()
    n = sum(p.numel() for p in m.parameters())
    assert n == 55_732_739 + (128 * 512 + 512) + (512 * 512 + 512)
    expected = {  # name -> shape, as in the authors' SongUNet with configs/cifar10_generate_images.yaml
        "model.map_layer0.weight": (512, 128), "model.map_layer1.bias": (512,), "model.map_layer0_s.weight": (512, 128),
        "model.map_layer1_s.weight": (512, 512), "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3), "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.32x32_block0.affine.weight": (256, 512), "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1), "model.enc.16x16_block3.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block3.norm2.bias": (256,), "model.dec.8x8_in0.proj.weight": (256, 256, 1, 1),
        "model.dec.8x8_block4.conv0.weight": (256, 512, 3, 3), "model.dec.16x16_block4.qkv.bias": (768,),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2), "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "model.enc.8x8_block0.qkv.weight" not in sd and "model.dec.16x16_block3.qkv.weight" not in sd
    assert not any("map_label" in k or "map_augment" in k or "map_noise" in k for k in sd)  # no weights there
    assert len(sd) == 428


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_and_names(name):
    m = random_unet(**VARIANTS[name])
    x, t, s, labels = inputs(m)
    y = m(x, t, s, class_labels=labels)
    assert y.shape == x.shape and y.dtype == torch.float64 and torch.isfinite(y).all()
    # per-sample times
    y2 = m(x, torch.full((3,), 0.9, dtype=torch.float64), torch.full((3,), 0.35, dtype=torch.float64),
           class_labels=labels)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)  # float32 features: batch-shape rounding
    sd = m.state_dict()
    if name == "ncsnpp":
        assert sd["model.map_noise.freqs"].shape == (16,) and sd["model.map_noise_s.freqs"].shape == (16,)
        assert "model.enc.8x8_aux_residual.weight" in sd and "model.dec.8x8_aux_conv.weight" in sd
        assert "model.dec.16x16_aux_up.resample_filter" in sd and sd["model.map_label.weight"].shape == (32, 5)
        torch.testing.assert_close(sd["model.enc.8x8_down.conv0.resample_filter"].reshape(4, 4),
                                   torch.tensor([1., 3, 3, 1]).outer(torch.tensor([1., 3, 3, 1])) / 64)
    if name == "adm":
        assert "model.out_conv.weight" in sd and "model.out_norm.weight" in sd
        assert "model.map_label.weight" in sd and "model.map_label.bias" not in sd
        assert m.model.map_noise_s is m.model.map_noise  # the authors' ADM shares the time features
        assert m.model.enc["8x8_block0"].num_heads == 2  # 128 channels / 64 per head


@pytest.mark.parametrize("name", list(VARIANTS))
def test_s_embedding_is_wired_as_the_authors(name):
    """emb = silu(map_layer1(silu(map_layer0(f(t) [+ labels]))) + map_layer1_s(silu(map_layer0_s(f(s))))), with
    f the positional features (cos/sin swapped for SongUNet), float64 throughout, as the authors' code runs it."""
    m = random_unet(**VARIANTS[name])
    net = m.model
    t, s = torch.tensor([500.0, 20.0]), torch.tensor([3.0, 7.0])
    labels = torch.eye(m.label_dim)[:2] if m.label_dim else None
    emb = net.embed(t, s, labels, None, 2, t.device)
    song = isinstance(net, SongUNet)

    def feats(mod, v):
        f = mod(v)
        if song:
            f = torch.cat([f[:, f.shape[1] // 2:], f[:, : f.shape[1] // 2]], dim=1)
        return f

    def lin(layer, v):
        out = v.double() @ layer.weight.double().t()
        return out + layer.bias.double() if layer.bias is not None else out

    silu = torch.nn.functional.silu
    h = feats(net.map_noise, t)
    if song and labels is not None:
        h = h + lin(net.map_label, labels.double() * math.sqrt(m.label_dim))
    h = lin(net.map_layer1, silu(lin(net.map_layer0, h)))
    if not song and labels is not None:
        h = h + lin(net.map_label, labels.double())
    h = h + lin(net.map_layer1_s, silu(lin(net.map_layer0_s, feats(net.map_noise_s, s))))
    if name != "ncsnpp":
        assert emb.dtype == torch.float64  # positional features are float64 (float32 t times float64 freqs)
    torch.testing.assert_close(emb.double(), silu(h), rtol=1e-5, atol=1e-6)
    if song and name == "ddpmpp":  # DDPM++ order: sin first; at t = 0 the features are [0..0, 1..1]
        f0 = feats(net.map_noise, torch.zeros(1))
        assert torch.equal(f0, torch.cat([torch.zeros(1, 8), torch.ones(1, 8)], 1).double())
    # without s_embed there are no s weights and s does not matter
    m2 = random_unet(**{**VARIANTS[name], "s_embed": False})
    assert not any("_s." in k for k in m2.state_dict())
    x, tt, _, lab = inputs(m2)
    a = m2.forward_model(x.float(), tt.float().reshape(1, 1, 1, 1), torch.tensor(0.1).reshape(1, 1, 1, 1), None
                         if lab is None else m2.prepare_labels(lab, 3, x.device))
    b = m2.forward_model(x.float(), tt.float().reshape(1, 1, 1, 1), torch.tensor(0.7).reshape(1, 1, 1, 1), None
                         if lab is None else m2.prepare_labels(lab, 3, x.device))
    assert torch.equal(a, b)


def test_dropout_masks_match_between_calls_with_the_same_rng_state():
    m = random_unet(**DDPMPP).train()
    x, t, s, _ = inputs(m)
    torch.manual_seed(3)
    a = m(x, t, s)
    torch.manual_seed(3)
    b = m(x, t, s)
    c = m(x, t, s)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_unet_configs_are_refused():
    with pytest.raises(ValueError, match="model_type='UNet'"):
        ModelConfig(model_type="UNet")
    with pytest.raises(ValueError, match="encoder_type"):
        ModelConfig(**{**DDPMPP, "encoder_type": "fancy"})
    with pytest.raises(ValueError, match="channel_mult"):
        ModelConfig(**{**DDPMPP, "channel_mult": ()})
    with pytest.raises(ValueError, match="divisible by 2"):
        ModelConfig(**{**DDPMPP, "img_resolution": 30})
    with pytest.raises(ValueError, match="GroupNorm"):
        ModelConfig(**{**DDPMPP, "model_channels": 36})  # 36 x 4 = 144 channels in 32 groups
    with pytest.raises(ValueError, match="positional"):
        ModelConfig(**{**ADM, "embedding_type": "fourier"})
    with pytest.raises(ValueError, match="channel_mult"):
        SongUNet(32, 3, 3, channel_mult=[2, 0])
    with pytest.raises(ValueError, match="compile mode"):
        random_unet(**DDPMPP).model.compile_regions("everything")
    ModelConfig(**{**DDPMPP, "hidden_size": 100, "num_heads": 7})  # DiT-only fields do not matter for a UNet


def test_configs_saved_with_the_old_arch_key_still_load():
    from imm_fast.config import load_train_config

    c = load_train_config({"preset": "digits", "model": {"arch": "DiT", "depth": 2}})
    assert (c.model.model_type, c.model.depth) == ("DiT", 2)
    c = load_train_config({"preset": "cifar10", "model.channel_mult": [1, 2], "model.model_channels": 32})
    assert (c.model.channel_mult, c.model.model_channels) == ((1, 2), 32)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def authors_kwargs(m):
    """IMMPrecond init kwargs as the authors' config records them (lists, ints, numpy scalars)."""
    kw = {k: v for k, v in m.init_kwargs.items() if k not in ("channels_last", "label_dropout")}
    kw["T"] = np.float64(kw["T"])
    kw["time_scale"] = 1000
    return kw


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loads_authors_pickle_format(tmp_path, monkeypatch, name):
    m = random_unet(**VARIANTS[name])
    path = tmp_path / "cifar10.pkl"
    marker = tmp_path / "executed"
    write_official_pickle(path, m, authors_kwargs(m), monkeypatch,
                          module_src=f"open({str(marker)!r}, 'w').write('stored source was executed')")
    raw = path.read_bytes()
    assert b"_reconstruct_persistent_obj" in raw and b"UNetBlock" in raw and (b"SongUNet" in raw or
                                                                              b"DhariwalUNet" in raw)
    loaded = imm_fast.load_official(path)
    assert not marker.exists()
    assert type(loaded.model) is type(m.model) and not loaded.training
    assert_same_outputs(m, loaded)
    save_model(tmp_path / "again.safetensors", loaded)  # numpy scalars became JSON-able
    assert_same_outputs(m, imm_fast.load_official(tmp_path / "again.safetensors"))


def test_authors_pickle_with_omegaconf_kwargs(tmp_path, monkeypatch):
    """The authors build the network from a Hydra/OmegaConf config (`**config.network`), so the init kwargs their
    persistence records can hold ListConfig/DictConfig objects: the loader reads their values without omegaconf's
    code (its classes become inert records) and still refuses anything else."""
    import copy

    omegaconf = pytest.importorskip("omegaconf")
    m = random_unet(**NCSNPP)
    kw = authors_kwargs(m)
    kw["embedding_kwargs"] = {"scale": 0.02}
    kw["T"] = float(kw["T"])  # YAML numbers are plain floats
    node = omegaconf.OmegaConf.create({"network": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in kw.items()}})
    stored = copy.deepcopy(dict(**node.network))  # what persistence's copy.deepcopy(kwargs) keeps
    assert type(stored["channel_mult"]).__name__ == "ListConfig"
    assert type(stored["embedding_kwargs"]).__name__ == "DictConfig"
    path = tmp_path / "cifar10.pkl"
    write_official_pickle(path, m, stored, monkeypatch)
    monkeypatch.setitem(__import__("sys").modules, "omegaconf", None)  # the loader must not need it
    loaded = imm_fast.load_official(path)
    assert loaded.init_kwargs["channel_mult"] == [1, 2] and loaded.init_kwargs["resample_filter"] == [1, 3, 3, 1]
    assert loaded.init_kwargs["embedding_kwargs"] == {"scale": 0.02}
    assert_same_outputs(m, loaded)


def test_authors_pickle_with_keys_their_unet_ignores(tmp_path, monkeypatch):
    """Their ADM takes **kwargs: SongUNet-only keys in a DhariwalUNet config are ignored, with a warning."""
    m = random_unet(**ADM)
    path = tmp_path / "adm.pkl"
    write_official_pickle(path, m, {**authors_kwargs(m), "encoder_type": "standard", "resample_filter": [1, 1]},
                          monkeypatch)
    with pytest.warns(UserWarning, match="encoder_type"):
        loaded = imm_fast.load_official(path)
    assert_same_outputs(m, loaded)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_safetensors_and_plain_state_dict_round_trips(tmp_path, name):
    m = random_unet(**VARIANTS[name])
    save_model(tmp_path / "m.safetensors", m)
    assert_same_outputs(m, imm_fast.load_official(tmp_path / "m.safetensors"))
    # Plain state dicts (with and without the model. prefix): the architecture comes from names and shapes.
    sd = m.state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    settings = {k: m.init_kwargs[k] for k in ("f_type", "temb_type", "eps")}
    loaded = imm_fast.load_official(tmp_path / "sd.pt", model_kwargs=settings)
    assert loaded.model_type == m.model_type
    for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "s_embed"):
        assert loaded.init_kwargs[k] == m.init_kwargs[k], k
    if name != "adm":
        for k in ("embedding_type", "encoder_type", "decoder_type", "resample_filter", "channel_mult_noise"):
            assert loaded.init_kwargs[k] == m.init_kwargs[k], k
    assert_same_outputs(m, loaded)
    from safetensors.torch import save_file

    save_file({k[len("model."):]: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bare.safetensors"))
    assert_same_outputs(m, imm_fast.load_official(tmp_path / "bare.safetensors", model_kwargs=settings))


def test_plain_ddpmpp_state_dict_defaults_to_the_cifar_settings(tmp_path):
    m = random_unet(**DDPMPP)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    loaded = imm_fast.load_official(tmp_path / "sd.pt")
    assert (loaded.f_type, loaded.temb_type, loaded.eps, loaded.T) == ("simple_edm", "identity", 0.006, 0.994)
    assert_same_outputs(m, loaded)


# ---------------------------------------------------------------------------------------------------------------
# The cifar10 preset: train, resume exactly, sample
# ---------------------------------------------------------------------------------------------------------------
def cifar_fixture(root, n=8):
    import pickle

    rng = np.random.RandomState(0)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.randint(0, 10, n))}, f)
    return root


SMALL = {"model.model_channels": 8, "model.channel_mult": [1, 2], "model.num_blocks": 1, "batch_size": 8,
         "sample.num_images": 4, "sample.steps": [1, 2], "eval_steps": [1], "final_eval": False, "progress": False,
         "log_every": 1, "device": "cpu", "threads": 1}


def test_cifar10_preset_is_the_papers_ddpmpp_recipe():
    c = PRESETS["cifar10"]
    m = c.model
    assert (m.model_type, m.model_channels, m.channel_mult, m.num_blocks, m.attn_resolutions, m.dropout,
            m.embedding_type, m.encoder_type, m.decoder_type, m.resample_filter, m.channel_mult_noise, m.s_embed) == (
        "SongUNet", 128, (2, 2, 2), 4, (16,), 0.2, "positional", "standard", "standard", (1, 1), 1, True)
    assert (m.f_type, m.temb_type, m.noise_schedule, m.eps, m.T, m.label_dim, m.time_scale) == (
        "simple_edm", "identity", "fm", 0.006, 0.994, 0, 1000.0)
    assert (c.loss.a, c.loss.b, c.loss.k, c.loss.group_size, c.data.hflip, c.data.class_conditional) == (
        1, 5.0, 15, 4, True, False)
    assert (c.batch_size, c.lr, c.ema_decay, c.betas, c.weight_decay) == (4096, 1e-4, 0.9999, (0.9, 0.999), 0.0)
    assert PRESETS["cifar10-dit"].model.model_type == "DiT"


def test_cifar10_preset_trains_resumes_exactly_and_samples(tmp_path):
    from safetensors.torch import load_file

    from imm_fast.__main__ import main

    root = cifar_fixture(tmp_path / "cifar-10-batches-py")
    common = {**SMALL, "data.path": str(root), "out_dir": str(tmp_path), "ckpt_every": 2}
    full = imm_fast.train("cifar10", run_name="full", max_steps=3, **common)
    part = imm_fast.train("cifar10", run_name="part", max_steps=2, **common)
    assert part.step == 2
    resumed = imm_fast.train("cifar10", resume=str(part.run_dir), max_steps=3, **common)
    assert resumed.step == 3
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(full.checkpoint / name)), load_file(str(resumed.checkpoint / name))
        assert a.keys() == b.keys() and "model.dec.16x16_in0.qkv.weight" in a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert (full.run_dir / "samples" / "step-0000003-2step.png").is_file()

    ema = imm_fast.load_official(full.run_dir)
    assert isinstance(ema.model, SongUNet) and ema.f_type == "simple_edm" and ema.label_dim == 0
    # The paper's 2-step sampler: T -> t(eta = 1.4) -> eps.
    z = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    x = imm_fast.sample(ema, z, grid=(1.4,))
    t1 = torch.tensor(float(torch.tensor(1.4) / (1 + torch.tensor(1.4))), dtype=torch.float64)
    T, eps = torch.tensor(0.994, dtype=torch.float64), torch.tensor(0.006, dtype=torch.float64)
    with torch.no_grad():
        manual = ema(ema(z.double(), T, t1).double(), t1, eps)
    assert torch.equal(x, manual.double()) and torch.isfinite(x).all()
    assert not torch.equal(x, imm_fast.sample(ema, z, 2))  # differs from the uniform 2-step grid
    out = tmp_path / "two.png"
    assert main(["sample", str(full.run_dir), "--grid", "1.4", "--num", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(full.run_dir), "--grid", "fast", "--out", str(tmp_path / "bad.png")]) == 2


# ---------------------------------------------------------------------------------------------------------------
# CUDA: channels_last, bf16 autocast, regional compile (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------------------
def test_channels_last_is_a_cuda_only_layout():
    m = random_unet(**DDPMPP)
    assert all(p.is_contiguous() for p in m.parameters())  # CPU: untouched
    x = torch.randn(2, 3, 32, 32)
    assert m.model._input_layout(x) is x


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_channels_last_bf16_and_compile(name):
    """channels_last changes layout only; bf16 autocast stays close to fp32; the regionally compiled UNet
    (DDPM++ only: compiling is slow) gives the eager bf16 result."""
    ref = random_unet(**VARIANTS[name]).cuda()
    stem = next(iter(ref.model.enc.values())).weight
    assert stem.is_contiguous(memory_format=torch.channels_last)
    x, t, s, labels = inputs(ref)
    x, t, s = x.cuda(), t.cuda(), s.cuda()
    labels = labels.cuda() if labels is not None else None
    flat = dataclasses.replace(ModelConfig(**VARIANTS[name]), channels_last=False)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y32 = ref(x, t, s, class_labels=labels)
        other = build_model(flat).cuda().eval()
        other.load_state_dict(ref.state_dict())
        assert next(iter(other.model.enc.values())).weight.is_contiguous()
        torch.testing.assert_close(other(x, t, s, class_labels=labels), y32, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        bf = build_model(dataclasses.replace(flat, mixed_precision="bf16", channels_last=True)).cuda().eval()
        bf.load_state_dict(ref.state_dict())
        y16 = bf(x, t, s, class_labels=labels)
        scale = y32.abs().max().item()
        assert (y16 - y32).abs().max().item() < 0.05 * scale
        if name == "ddpmpp":
            bf.model.compile_regions("regional")
            torch.testing.assert_close(bf(x, t, s, class_labels=labels), y16, rtol=0.02, atol=0.02 * scale)


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint's declared UNet size against its stored parameters, before anything is allocated
# ---------------------------------------------------------------------------------------------------------------
def _declaring(tmp_path, init_kwargs, name="declares.safetensors"):
    import json

    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({"model.map_layer0.weight": torch.zeros(2, 2)}, str(path),
              metadata={"format": "imm_fast", "init_kwargs": json.dumps(init_kwargs)})
    return path


@pytest.mark.parametrize("declared,words", [
    (dict(model_channels=512, num_blocks=8), ["model_channels=512", "num_blocks=8", "parameters", "stores 4"]),
    (dict(model_channels=65536), ["model_channels=65536", "parameters"]),
    (dict(model_channels=1 << 20), ["init_kwargs.model_channels=1048576 exceeds the cap"]),
    (dict(num_blocks=4, channel_mult=[1, 2, 999]), ["init_kwargs.channel_mult=[1, 2, 999] exceeds the cap"]),
])
def test_declared_unet_size_is_checked_against_the_stored_weights_at_once(tmp_path, declared, words):
    """A file of a few hundred bytes declaring a big SongUNet is refused in well under a second (it used to
    allocate 7.6 GB for 51 s, or end in an allocation traceback)."""
    path = _declaring(tmp_path, {**DDPMPP, **declared})
    assert path.stat().st_size < 1024
    assert_load_refused(path, 1.0, words)


@pytest.mark.parametrize("depth", [30, 100_000])
def test_deeply_nested_init_kwargs_are_a_clear_error(tmp_path, depth):
    from imm_fast.errors import CheckpointError

    from safetensors.torch import save_file

    path = tmp_path / "nested.safetensors"
    nested = '{"model_channels": 16, "extra": ' + "[" * depth + "]" * depth + "}"
    text = '{"model_type": "SongUNet", "img_resolution": 32, "img_channels": 3, "embedding_kwargs": ' + nested + "}"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "imm_fast", "init_kwargs": text})
    with pytest.raises(CheckpointError, match=r"nested\.safetensors.*(nests? deeper than \d+ levels|not JSON)"):
        imm_fast.load_official(path)
