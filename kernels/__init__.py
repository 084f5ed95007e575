"""Triton kernels of imm_fast, installed as `imm_fast.kernels`. Importing a submodule imports triton."""
from ._launch import interpreter_compat as _interpreter_compat

_interpreter_compat()  # only under TRITON_INTERPRET=1: lets triton 3.6's interpreter run every kernel here
