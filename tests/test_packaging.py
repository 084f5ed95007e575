import os
import subprocess
import sys
from pathlib import Path

import imm_fast

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_resolves_into_kernels_folder():
    import imm_fast.kernels

    assert Path(imm_fast.kernels.__file__).resolve().parent == (ROOT / "kernels").resolve()


BLOCK_TRITON = """
import importlib.abc, sys
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton' (blocked by the test)")
sys.meta_path.insert(0, _NoTriton())
"""


def test_works_without_triton_or_a_compiler():
    """With triton unimportable, the package imports and runs its reference paths; no kernel module loads."""
    code = BLOCK_TRITON + (
        "import torch, imm_fast\n"
        "x = torch.randn(8, 5); y = torch.randn(8, 5)\n"
        "v = imm_fast.mmd_loss(x, y, 4, backend='torch')\n"
        "m = imm_fast.build_model(imm_fast.ModelConfig(img_resolution=4, img_channels=1, label_dim=2, patch_size=2,"
        " hidden_size=16, depth=1, num_heads=2)).eval()\n"
        "out = imm_fast.sample(m, torch.randn(2, 1, 4, 4), steps=2)\n"
        "assert 'triton' not in sys.modules and 'imm_fast.kernels.mmd' not in sys.modules\n"
        "print('ok', float(v) >= 0, tuple(out.shape))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IMM_FAST_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["ok", "True"]


def test_import_is_lazy():
    code = "import sys, imm_fast; print(any(m.startswith(('imm_fast.ops', 'imm_fast.models', 'triton')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api():
    for name in ("train", "sample", "mmd_loss", "load_official", "ModelConfig", "LossConfig", "SampleConfig"):
        assert name in imm_fast.__all__
    assert callable(imm_fast.mmd_loss) and callable(imm_fast.sample) and callable(imm_fast.load_official)


def test_train_stays_the_function_after_the_training_module_is_imported():
    import importlib

    importlib.import_module("imm_fast.training")
    importlib.import_module("imm_fast.__main__")
    assert callable(imm_fast.train) and imm_fast.train.__module__ == "imm_fast.training"


def test_dir_lists_the_public_surface_once():
    import imm_fast

    imm_fast.train, imm_fast.sample  # noqa: B018 (cache two lazy attributes in the module globals)
    names = dir(imm_fast)
    assert len(names) == len(set(names)) and "annotations" not in names
    assert set(imm_fast.__all__) <= set(names)
