"""Reading pickles and torch zip archives that may be hostile: one restricted unpickler and the caps around it.

A pickle is a program for a stack machine: beside running code (refused here by an allow-list of globals) it can
make a few kilobytes describe an object graph that explodes when walked, through shared references (a list
[L, L] nested 40 deep is 2^40 elements to anything that copies, hashes or iterates it) or nesting (a recursion).
`scan_pickle` replays the stream's opcodes without building anything, and refuses one whose graph, expanded as a
tree, exceeds MAX_PICKLE_NODES nodes or MAX_PICKLE_DEPTH levels, in time linear in the stream. `restricted_load`
scans, then unpickles with `RestrictedUnpickler`. `check_torch_zip` refuses a zip archive whose entries declare
more than ZIP_EXPANSION x its size (a zip bomb; torch stores tensors uncompressed) and scans its data.pkl, before
torch inflates anything.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools

from ..errors import CheckpointError, UnsafeCheckpointError, excerpt

ZIP_EXPANSION = 4
ZIP_SLACK = 1 << 20
MAX_PICKLE_NODES = 2_000_000  # the object graph expanded as a tree (an authors' DiT: 1.9e3 per block, DiT-XL ~6e4)
MAX_PICKLE_DEPTH = 1000       # object nesting (a module is about 5 levels; a DiT nests about 6 modules)
_INPLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}  # grow the object below them
_MARK = -1


def _expanded(children: list, root: int, cap: int):
    """(size, depth) of the tree that node `root` of a DAG unfolds to; size saturates past `cap`. An edge back to
    a node still being expanded (a cycle) counts as one node: the walkers refuse cycles with their own message."""
    size, depth, state = {}, {}, {}
    todo = [(root, 0)]
    while todo:
        node, i = todo.pop()
        state.setdefault(node, 1)
        kids = children[node]
        if i < len(kids):
            todo.append((node, i + 1))
            if kids[i] not in state:
                todo.append((kids[i], 0))
            continue
        s, d = 1, 0
        for k in kids:
            done = state.get(k) == 2
            s += size[k] if done else 1
            d = max(d, depth[k] if done else 1)
            if s > cap:
                break
        size[node], depth[node], state[node] = min(s, cap + 1), d + 1, 2
    return size[root], depth[root]


class _SkipPayloads:
    """A file view for the scan: large reads (tensor storage bytes) are skipped with a seek and answered with
    lazily allocated zero bytes, so scanning a multi-GB checkpoint does not read its tensors."""

    def __init__(self, f):
        self.f = f
        start = f.tell()
        self.end = f.seek(0, io.SEEK_END)
        f.seek(start)

    def read(self, n=-1):
        if n is None or n < (1 << 16):
            return self.f.read(n)
        n = min(n, self.end - self.f.tell())
        self.f.seek(n, io.SEEK_CUR)
        return bytes(n)

    def readline(self):
        return self.f.readline()

    def tell(self):
        return self.f.tell()


def _replay(f, source) -> tuple:
    """(children lists of every object the stream builds, the root's index): the pickle's stack machine run on
    object indices instead of objects (pickletools' opcode table gives each opcode's stack effect)."""
    children, stack, memo = [], [], {}
    root = None
    for op, arg, _ in pickletools.genops(_SkipPayloads(f) if f.seekable() else f):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            root = stack[-1]
            break
        if name == "MARK":
            stack.append(_MARK)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "POP":
            stack.pop()
        else:
            before = op.stack_before
            sliced = []
            if pickletools.markobject in before:
                at = len(stack) - 1 - stack[::-1].index(_MARK)
                sliced, stack[at:] = stack[at + 1:], []
                before = before[:before.index(pickletools.markobject)]
            fixed = stack[len(stack) - len(before):] if before else []
            del stack[len(stack) - len(before):]
            used = fixed + sliced
            if name in _INPLACE:
                children[used[0]].extend(used[1:])
                stack.append(used[0])
            elif op.stack_after:
                children.append(used)
                stack.append(len(children) - 1)
    if root is None or root == _MARK:
        raise ValueError("the pickle has no STOP opcode (truncated)")
    return children, root


def scan_pickle(f, source, max_nodes: int = MAX_PICKLE_NODES, max_depth: int = MAX_PICKLE_DEPTH):
    """Refuse (UnsafeCheckpointError naming `source`) a pickle whose object graph, expanded, exceeds the caps;
    a malformed stream is a CheckpointError. `f` is read to the pickle's end; the caller rewinds it."""
    try:
        children, root = _replay(f, source)
    except (ValueError, KeyError, IndexError, EOFError) as e:  # genops' errors, a GET of no PUT, a stack underflow
        raise CheckpointError(f"{str(source)!r} is not a well-formed pickle ({type(e).__name__}: "
                              f"{excerpt(str(e), 120)})") from None
    size, depth = _expanded(children, root, max_nodes)
    if size > max_nodes:
        raise UnsafeCheckpointError(f"{str(source)!r}: its objects expand to more than {max_nodes:,} nodes through "
                                    "shared references (a pickle bomb?); refusing to load it "
                                    "(imm_fast.checkpoints.safe_pickle.MAX_PICKLE_NODES)")
    if depth > max_depth:
        raise UnsafeCheckpointError(f"{str(source)!r}: its objects nest deeper than {max_depth} levels; refusing "
                                    "to load it (imm_fast.checkpoints.safe_pickle.MAX_PICKLE_DEPTH)")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `allowed` ((module, name) -> object), or what
    `fallback(module, name)` returns (None: refused); persistent ids are refused. `what` names the file kind in
    the error."""

    def __init__(self, file, allowed: dict, what: str = "the file", fallback=None, **kw):
        super().__init__(file, **kw)
        self.allowed, self.what, self.fallback = allowed, what, fallback

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        found = self.fallback(module, name) if self.fallback is not None else None
        if found is not None:
            return found
        raise UnsafeCheckpointError(
            f"refusing to load {module[:80]}.{name[:80]} from {self.what}: it is not on "
            "imm_fast's allow-list (loading it could execute code). If this file is a checkpoint you trust, convert "
            "it to a state dict.")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"persistent id {excerpt(pid)} in a plain pickle is not allowed")


def restricted_load(f, source, allowed: dict, what: str, fallback=None, **kw):
    """scan_pickle, then RestrictedUnpickler(...).load() from the same start: the object of the pickle in `f`."""
    start = f.tell()
    scan_pickle(f, source)
    f.seek(start)
    return RestrictedUnpickler(f, allowed, what, fallback, **kw).load()


def numpy_array_globals() -> dict:
    """The globals a pickled numpy array or scalar needs (data-only constructors)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = core.multiarray._reconstruct
        out[(mod, "scalar")] = core.multiarray.scalar
    return out


# --------------------------------------------------------------------------------------------------------------
# Zip archives (torch.save files, storage records inside a pickle)
# --------------------------------------------------------------------------------------------------------------
def check_zip(source, data=None):
    """Refuse a zip archive whose entries declare more than ZIP_EXPANSION x its size (a zip bomb); `data`: the
    archive's bytes when it is not the file `source` itself. Returns the open ZipFile's entry names."""
    import zipfile

    try:
        size = len(data) if data is not None else os.path.getsize(source)
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else source) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{str(source)!r} is not a readable zip archive: {excerpt(str(e), 120)}") from None
    declared = sum(max(0, i.file_size) for i in infos)
    if declared > ZIP_EXPANSION * size + ZIP_SLACK:
        raise CheckpointError(f"{str(source)!r}: its zip entries declare {declared:,} bytes but the archive holds "
                              f"{size:,} (more than {ZIP_EXPANSION}x): refusing a possible zip bomb")
    return [i.filename for i in infos]


def check_torch_zip(source, data=None):
    """check_zip, then scan_pickle of the archive's data.pkl: a torch.save file that torch.load(weights_only=True)
    may inflate (a checkpoint's train_state.pt, a state dict, a storage record)."""
    import zipfile

    names = check_zip(source, data)
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
        return
    with zipfile.ZipFile(io.BytesIO(data) if data is not None else source) as z, z.open(pkl[0]) as f:
        scan_pickle(io.BytesIO(f.read()), f"{source} ({pkl[0]})")


def check_tensor_bytes(sd, source, limit):
    """Each tensor may hold at most `limit` bytes (the file's size): a stored view cannot claim more."""
    import torch

    for name, t in sd.items():
        if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > limit:
            raise CheckpointError(f"{str(source)!r}: tensor {excerpt(name)} declares shape {tuple(t.shape)} "
                                  f"({t.numel() * t.element_size():,} bytes) but the file holds {limit:,} bytes")
