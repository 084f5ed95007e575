"""Shared test helpers."""
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
