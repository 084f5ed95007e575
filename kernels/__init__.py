"""Triton kernels of imm_fast, installed as `imm_fast.kernels`. Importing a submodule imports triton."""
