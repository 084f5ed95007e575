"""Shared test helpers."""
import time

import pytest
import torch

from imm_fast.config import ModelConfig
from imm_fast.models import build_model


def random_model(std=0.1, **kw):
    """A small IMM model in eval mode with every trainable weight drawn from N(0, std^2): the adaLN-Zero
    initialization would make every output trivially x_t, so tests never run on it."""
    m = build_model(ModelConfig(**kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return m.eval()


# A tiny DiT training run for fault tests: 1 thread (a tiny model on a shared CPU is many times faster without
# thread contention), a checkpoint every 2 steps, nothing slow at the end.
FAST_TRAIN = {"model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "batch_size": 16, "lr": 1e-3,
              "loss.backend": "torch", "sample.num_images": 4, "sample.steps": [1], "progress": False,
              "final_eval": False, "log_every": 1, "sample_every": 0, "ckpt_every": 2, "device": "cpu",
              "threads": 1}


class NaNFirstGroup(torch.nn.Module):
    """Wraps an IMM model so that the first group (rows 0-1) of its output is NaN: in every pass, or with
    target_only only in the no-grad target pass (the one imm_loss runs with force_fp32=True)."""

    def __init__(self, model, target_only=False):
        super().__init__()
        self.inner, self.target_only = model, target_only
        for k in ("noise_schedule", "eps", "T", "sigma_data", "label_dim", "f_type", "alpha_sigma"):
            setattr(self, k, getattr(model, k))

    def forward(self, x, t, s, class_labels=None, force_fp32=False):
        y = self.inner(x, t, s, class_labels=class_labels)
        return torch.cat([y[:2] * float("nan"), y[2:]]) if force_fp32 or not self.target_only else y


def assert_load_refused(path, seconds, words):
    """imm_fast.load_official(path) raises CheckpointError within `seconds`, the message naming the file and
    every one of words (the loader's caps and checks act before anything large is allocated)."""
    import imm_fast
    from imm_fast.errors import CheckpointError

    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        imm_fast.load_official(path)
    assert time.perf_counter() - t0 < seconds
    for w in [path.name] + list(words):
        assert w in str(info.value), (w, str(info.value))
