"""Test setup: Triton kernels run under the interpreter on CPU tensors when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs per test."""
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that train with threads=N leave torch's thread count as they found it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
