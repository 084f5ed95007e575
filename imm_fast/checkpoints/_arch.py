"""Architecture code moved here unchanged from imm_fast/checkpoint.py (only the relative imports gained a dot):
building an IMM model from stored init kwargs, the caps on declared sizes, and inferring a backbone's architecture
from a state dict. The backbone registry (imm_fast/models) takes this over.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from ..errors import CheckpointError

MODEL_CAPS = {"depth": 1024, "hidden_size": 65536, "num_heads": 4096, "img_resolution": 16384,
              "img_channels": 1024, "label_dim": 1_000_000, "patch_size": 1024, "mlp_ratio": 256.0,
              "model_channels": 65536, "num_blocks": 1024, "channel_mult_emb": 256, "channel_mult_noise": 256}


def _backbone_parameters(model_type):
    """Constructor keywords of the backbone that model_type names (the DiT also takes 'skip', unused)."""
    from ..models.dit import DiT
    from ..models.unet import UNET_TYPES

    cls = UNET_TYPES.get(model_type, DiT)
    extra = set() if model_type in UNET_TYPES else {"skip"}
    return (set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}) | extra


def _imm_parameters():
    from ..models.imm import IMM

    return set(inspect.signature(IMM.__init__).parameters) - {"self", "model_kwargs"}


def _check_model_kwargs(kwargs, source="the checkpoint", state_dict=None):
    """Types, ranges and MODEL_CAPS of the model dimensions a checkpoint declares, before anything is built; for a
    DiT also that the declared size agrees with the stored parameters (depth=1e7 over a small file is refused)."""
    from ..config import ModelConfig, check_fields
    from ..errors import ConfigError

    src = str(source)
    dims = {k: kwargs[k] for k in MODEL_CAPS if k in kwargs}
    try:
        dims = check_fields(ModelConfig, dims, prefix="init_kwargs")
    except ConfigError as e:
        raise CheckpointError(f"{src!r}: {e}") from None
    for k, v in dims.items():
        if v > MODEL_CAPS[k]:
            raise CheckpointError(f"{src!r}: init_kwargs.{k}={v!r} exceeds the cap {MODEL_CAPS[k]!r} "
                                  "(imm_fast.checkpoint.MODEL_CAPS)")
    model_type = kwargs.get("model_type", "DiT")
    if state_dict is None or not (isinstance(model_type, str) and model_type.startswith("DiT")):
        return
    from ..models.imm import dit_kwargs_for

    try:
        dit = {**dit_kwargs_for(model_type), **dims}
    except ValueError as e:
        raise CheckpointError(f"{src!r}: init_kwargs.{e}") from None
    if {"depth", "hidden_size"} <= set(dit):
        C, r = dit["hidden_size"], dit.get("mlp_ratio", 4.0)
        declared = dit["depth"] * (10 + 2 * r) * C * C  # per block: qkv + proj 4C^2, MLP 2rC^2, adaLN 6C^2
        stored = sum(t.numel() for t in state_dict.values() if isinstance(t, torch.Tensor))
        if declared > 2 * stored + (1 << 20):
            raise CheckpointError(f"{src!r}: init_kwargs depth={dit['depth']}, hidden_size={C} declare about "
                                  f"{declared:,.0f} parameters but the file stores {stored:,}")


def build_from_kwargs(init_kwargs, state_dict, device="cpu", fused=None, source="the checkpoint"):
    """An IMM model from stored constructor kwargs, loaded with `state_dict` (strict), in eval mode.

    Keys the authors' backbone accepts but ignores (it takes **kwargs) are dropped with a warning. source: the
    file, named in every error.
    """
    from ..models.imm import IMM

    import numpy as np

    src = str(source)
    if not isinstance(init_kwargs, dict) or not all(isinstance(k, str) for k in init_kwargs):
        raise CheckpointError(f"{src!r}: init_kwargs must be a dict of named values, got "
                              f"{type(init_kwargs).__name__}")
    kw = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in init_kwargs.items()}
    missing_required = [k for k in ("img_resolution", "img_channels") if k not in kw]
    if missing_required:
        raise CheckpointError(f"{src!r}: init_kwargs lack {missing_required} (they have {sorted(kw)})")
    model_type = kw.get("model_type", "DiT")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{src!r}: init_kwargs.model_type must be a string, got {type(model_type).__name__}")
    allowed = _imm_parameters() | _backbone_parameters(model_type)
    for k in ("in_channels", "out_channels"):  # the wrapper passes img_channels for both
        kw.pop(k, None)
    ignored = sorted(k for k in kw if k not in allowed)
    for k in ignored:
        kw.pop(k)
    if ignored:
        warnings.warn(f"checkpoint init kwargs ignored (the authors' {model_type} ignores them too): {ignored}")
    if fused is not None and "fused" in allowed:  # the DiT's switch; the UNets have no fused path
        kw["fused"] = fused
    if isinstance(kw.get("embedding_kwargs"), dict):
        kw["embedding_kwargs"] = dict(kw["embedding_kwargs"])
    _check_model_kwargs(kw, source, state_dict)
    try:
        model = IMM(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src!r}: cannot build the model from its init_kwargs: {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{src!r} does not match the model built from its init_kwargs: "
                              f"{' '.join(str(e).split())}") from None
    if missing or unexpected:
        raise CheckpointError(f"{src!r} does not match the model built from its init_kwargs: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")
    return model.to(device).eval().requires_grad_(False)


_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # the DiT paper's widths (S, B, L, XL) and their head counts


def infer_model_kwargs(state_dict, num_heads=None, source="the state dict"):
    """Backbone architecture from a state dict's shapes: a UNet (model.enc.* keys) or a DiT. DiT heads: `num_heads`
    if given, else hidden / head_dim when qk-norm weights store head_dim, else the DiT paper's table for its widths;
    any other width needs num_heads given."""
    sd = state_dict
    src = str(source)
    if any(k.startswith("model.enc.") for k in sd):
        try:
            return _infer_unet_kwargs(sd)
        except (KeyError, StopIteration, IndexError, ValueError) as e:
            raise CheckpointError(f"{src!r} is not an IMM UNet state dict ({type(e).__name__}: {e})") from None
    try:
        w = sd["model.x_embedder.proj.weight"]  # (C, Cin, p, p)
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        num_patches = sd["model.pos_embed"].shape[1]
        rows = sd["model.y_embedder.embedding_table.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{src!r} is not an IMM DiT state dict: it has no tensor {e.args[0]!r}") from None
    except (AttributeError, IndexError):
        raise CheckpointError(f"{src!r}: the embedder tensors have unexpected shapes") from None
    grid = int(round(num_patches ** 0.5))
    depth = len({k.split(".")[2] for k in sd if k.startswith("model.blocks.")})
    mlp_hidden = sd["model.blocks.0.mlp.fc1.weight"].shape[0] if "model.blocks.0.mlp.fc1.weight" in sd else 4 * hidden
    q_norm = sd.get("model.blocks.0.attn.q_norm.weight")
    if num_heads is None:
        if q_norm is not None and q_norm.dim() == 1 and q_norm.numel() and hidden % q_norm.numel() == 0:
            num_heads = hidden // q_norm.numel()  # LayerNorm(head_dim): unambiguous
        elif hidden in _HEADS:
            num_heads = _HEADS[hidden]
        else:
            raise CheckpointError(f"{src!r}: the number of attention heads of a width-{hidden} DiT cannot be read "
                                  "from its shapes; pass it: load_official(..., model_kwargs={'num_heads': H})")
    return dict(img_resolution=grid * patch, img_channels=in_ch, patch_size=patch, hidden_size=hidden, depth=depth,
                num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1, label_dim=rows - 1,
                s_embed="model.s_embedder.mlp.0.weight" in sd, qk_norm=q_norm is not None)


def _infer_unet_kwargs(sd):
    """SongUNet / DhariwalUNet constructor kwargs from the names and shapes of a state dict (model. prefix)."""
    import re

    song = not any(k.startswith("model.out_conv.") for k in sd)
    enc = {}  # resolution -> {block index: out channels}
    attn = set()
    for k, v in sd.items():
        m = re.match(r"model\.enc\.(\d+)x\d+_block(\d+)\.conv1\.weight$", k)
        if m:
            enc.setdefault(int(m[1]), {})[int(m[2])] = v.shape[0]
        m = re.match(r"model\.enc\.(\d+)x\d+_block\d+\.qkv\.weight$", k)
        if m:
            attn.add(int(m[1]))
    if not enc:
        raise KeyError("model.enc.<R>x<R>_block0.conv1.weight")
    conv = next(k for k in sd if re.match(r"model\.enc\.\d+x\d+_conv\.weight$", k))
    res = int(conv.split(".")[2].split("x")[0])
    in_ch = sd[conv].shape[1]
    noise_ch = sd["model.map_layer0.weight"].shape[1]
    emb_ch = sd["model.map_layer0.weight"].shape[0]
    mc = sd[conv].shape[0] if song else noise_ch  # Song: the stem conv is model_channels wide; ADM: the features
    levels = sorted(enc, reverse=True)
    label_key = "model.map_label.weight"
    kw = dict(img_resolution=res, img_channels=in_ch, model_type="SongUNet" if song else "DhariwalUNet",
              label_dim=sd[label_key].shape[1] if label_key in sd else 0, model_channels=mc,
              channel_mult=[enc[r][0] // mc for r in levels], channel_mult_emb=emb_ch // mc,
              num_blocks=len(enc[levels[0]]), attn_resolutions=sorted(attn, reverse=True),
              s_embed="model.map_layer0_s.weight" in sd)
    if "model.map_augment.weight" in sd:
        kw["augment_dim"] = sd["model.map_augment.weight"].shape[1]
    if song:
        f = next((v for k, v in sd.items() if k.endswith("resample_filter")), None)
        taps = [1, 1]
        if f is not None:  # f = outer(f1, f1) / sum(f1)^2: its diagonal's square root is f1 / sum(f1)
            f1 = f.reshape(f.shape[-2], f.shape[-1]).diagonal().double().sqrt()
            taps = [int(round(v)) for v in (f1 / f1.min()).tolist()]
        kw.update(embedding_type="fourier" if "model.map_noise.freqs" in sd else "positional",
                  channel_mult_noise=noise_ch // mc, resample_filter=taps,
                  encoder_type="residual" if any("_aux_residual" in k for k in sd) else
                  "skip" if any("_aux_skip" in k for k in sd) else "standard",
                  decoder_type="skip" if sum(k.endswith("_aux_conv.weight") for k in sd) > 1 else "standard")
    return kw
