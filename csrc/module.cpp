// Python module init so that `import imm_fast._C` (setup.py build) loads the library and with it the ops
// registered in torch.ops.imm_fast_C; the just-in-time build loads the same sources with torch.ops.load_library.
#include <Python.h>

#ifdef TORCH_EXTENSION_NAME
#define IMM_FAST_CAT2(a, b) a##b
#define IMM_FAST_CAT(a, b) IMM_FAST_CAT2(a, b)
#define IMM_FAST_STR2(a) #a
#define IMM_FAST_STR(a) IMM_FAST_STR2(a)

PyMODINIT_FUNC IMM_FAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, IMM_FAST_STR(TORCH_EXTENSION_NAME),
                                   "imm_fast C++/CUDA ops, registered as torch.ops.imm_fast_C.*", -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
