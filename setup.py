"""Packaging of imm_fast. kernels/ ships as imm_fast.kernels (package_dir mapping).

The C++/CUDA extension is built here only when torch is importable at build time (e.g.
`pip install --no-build-isolation -e .`) and IMM_FAST_BUILD_EXT is not "0"; otherwise it is built just in time
with ninja on first use (imm_fast/_ext.py), and without a compiler everything runs on the reference path.
"""
import os
import sys

from setuptools import setup

packages = ["imm_fast", "imm_fast.ops", "imm_fast.models", "imm_fast.kernels", "imm_fast.csrc"]
# csrc/ also ships as package data (imm_fast/csrc), so a wheel can still build the extension just in time.
package_dir = {"imm_fast": "imm_fast", "imm_fast.kernels": "kernels", "imm_fast.csrc": "csrc"}


def _cuda_toolkit_matches(here) -> bool:
    """False, after one warning line naming both versions, when the CUDA toolkit's major version differs from
    torch's (torch refuses to build CUDA code then): the C++ CPU kernels are built alone."""
    sys.path.insert(0, here)  # this checkout's imm_fast (its __init__ imports nothing heavy): one copy of the probe
    try:
        from imm_fast import _ext
    finally:
        sys.path.remove(here)
    why = _ext.cuda_mismatch()
    if why:
        sys.stderr.write(f"warning: imm_fast: {why}\n")
    return why is None


def ext_modules_and_cmdclass():
    """imm_fast._C from csrc/ (CPU loops always, CUDA kernels with a CUDA torch + toolkit), built optionally:
    a failed compile warns and leaves the just-in-time build / reference path to imm_fast/_ext.py."""
    if os.environ.get("IMM_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    names = sorted(os.listdir(csrc)) if os.path.isdir(csrc) else []
    cpp = [os.path.join("csrc", f) for f in names if f.endswith(".cpp")]
    cu = [os.path.join("csrc", f) for f in names if f.endswith(".cu")]
    if not cpp:
        return [], {}
    # Portable flags (no -march=native): the AVX2 loops are compiled separately and picked at run time.
    omp = ["-fopenmp"]
    if cu and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None and _cuda_toolkit_matches(here):
        ext = cpp_extension.CUDAExtension(
            "imm_fast._C", cpp + cu, include_dirs=[csrc],
            extra_compile_args={"cxx": ["-O3", "-DIMM_FAST_WITH_CUDA"] + omp, "nvcc": ["-O3", "-DIMM_FAST_WITH_CUDA"]},
            extra_link_args=omp)
    else:
        ext = cpp_extension.CppExtension("imm_fast._C", cpp, include_dirs=[csrc], extra_compile_args=["-O3"] + omp,
                                         extra_link_args=omp)

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # no compiler, a build error: the package still works without _C
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                sys.stderr.write(f"warning: building {ext.name} failed ({first}); imm_fast will build it just in "
                                 "time or use the reference path\n")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it to check the choice above
    ext_modules, cmdclass = ext_modules_and_cmdclass()
    setup(
        name="imm_fast",
        version="0.1.0",
        description="Fast, faithful Inductive Moment Matching: fused MMD, adaLN and attention kernels under a "
                    "PyTorch training and sampling layer",
        packages=packages,
        package_dir=package_dir,
        package_data={"imm_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
        python_requires=">=3.9",
        install_requires=[
            "torch>=2.3",
            "numpy",
            "einops",
            "safetensors",
            "pyyaml",
            "scikit-learn",  # the embedded 8x8 digits of the default training job
            "pillow",        # sample grids as PNG
            "triton; platform_system == 'Linux'",
        ],
        extras_require={
            # omegaconf: authors-format pickles store some init kwargs as OmegaConf containers
            "test": ["pytest", "pytest-benchmark", "ninja", "diffusers", "omegaconf", "huggingface_hub", "tensorboard",
                     "scipy"],
            "vae": ["diffusers"],
            "eval": ["scipy", "diffusers"],  # FID's sqrtm; diffusers decodes latent samples (--vae)
            "hub": ["huggingface_hub"],      # hf:// checkpoints (imm_fast.hub)
            "tensorboard": ["tensorboard"],  # log.tensorboard=true
            "wandb": ["wandb"],              # log.wandb=<project>
        },
        entry_points={"console_scripts": ["imm_fast=imm_fast.__main__:cli"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
