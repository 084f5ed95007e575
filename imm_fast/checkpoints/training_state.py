"""Training-state checkpoints: writing, verifying, the resolver, repair after a kill, and retention.

Layout: <run>/checkpoints/step-<7-digit step>/ {model,ema}.safetensors, train_state.pt, config.json and
manifest.json (sizes + sha256 of the four, written LAST), plus checkpoints/latest naming the newest. A checkpoint is
written into a temporary sibling and published by one rename; `latest` moves after it.

`resolve_checkpoint` is the resolver behind resume, load_official, evaluate, sample and push_to_hub: a
checkpoint folder must verify; a run folder (or its checkpoints/) gives its newest checkpoint that verifies, with
`latest` read here only, as a cross-check. Verification needs the manifest (a checkpoint without one is used only
with trust_unverified=True) and refuses links: checkpoint folders, their files and `latest` resolve only inside
the run's checkpoints/. `resolve_weights` maps any checkpoint argument (hf:// address, file, run folder) to the
weights file that is loaded, so a record can name exactly what was loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from .._files import atomic_write, atomic_write_text, file_sha256, fsync_dir
from ..errors import CheckpointError, CheckpointWriteError, NonFiniteError, excerpt
from .native import save_model
from .safe_pickle import check_torch_zip

CKPT_PREFIX = "step-"
MANIFEST = "manifest.json"
CKPT_FILES = ("model.safetensors", "ema.safetensors", "train_state.pt", "config.json")
_CKPT_NAME = re.compile(r"step-(\d+)")
_DELETING = ".deleting-"  # a checkpoint being removed by retention: renamed first, so a kill leaves no half folder
_TRUST_HINT = "pass trust_unverified=True (CLI: --trust-unverified) to use it anyway"


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def _step_of(name: str) -> int:
    return int(name[len(CKPT_PREFIX):])


def _test_pause(point: str, step: int):
    """Test-only: IMM_FAST_TEST_PAUSE=<point>[@<step>] stops a checkpoint write here until the process is killed
    (points: before_manifest, before_rename, after_rename, during_prune), so tests can kill -9 at a chosen moment."""
    want = os.environ.get("IMM_FAST_TEST_PAUSE")
    if not want:
        return
    name, _, at = want.partition("@")
    if name == point and (not at or int(at) == step):
        print(f"IMM_FAST_TEST_PAUSE {point} step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def _nonfinite(state_dicts) -> list:
    """(index of the state dict, name) of the floating-point tensors holding NaN or inf: one host sync for all."""
    keys = [(i, k) for i, sd in enumerate(state_dicts) for k, v in sd.items()
            if torch.is_tensor(v) and v.is_floating_point()]
    if not keys:
        return []
    ok = torch.stack([torch.isfinite(state_dicts[i][k]).all() for i, k in keys]).tolist()
    return [key for key, good in zip(keys, ok) if not good]


def nonfinite_entries(*state_dicts) -> list:
    """Names of floating-point tensors holding NaN or inf, over all the state dicts with one host sync."""
    return [k for _, k in _nonfinite(state_dicts)]


def _nbytes(obj, depth=0) -> int:
    """Bytes of the tensors in a (nested) state: the size a checkpoint of it takes on disk, near enough."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if depth < 20 and isinstance(obj, dict):
        return sum(_nbytes(v, depth + 1) for v in obj.values())
    if depth < 20 and isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, depth + 1) for v in obj)
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _write_failure(e: BaseException, ck_root: Path, name: str, needed: int) -> "CheckpointWriteError | None":
    """The one-line CheckpointWriteError for a write that failed for lack of space or an I/O error, else None
    (a bug keeps its traceback). torch.save and safetensors report a full disk as RuntimeError / SafetensorError."""
    free = _free_bytes(ck_root)
    if isinstance(e, OSError):
        reason = os.strerror(e.errno) if e.errno else excerpt(str(e), 120)
    elif any(m in str(e) for m in ("unexpected pos", "failed writing", "IoError", "No space", "Input/output",
                                   "quota")) or free < needed:
        reason = f"{type(e).__name__}: {excerpt(str(e), 120)}"
    else:
        return None
    prev = next((n for n in list_checkpoints(ck_root) if n != name), None)
    after = (f"the previous checkpoint {prev} is intact: free space, then resume={str(ck_root.parent)!r} continues "
             "from it" if prev else "no earlier checkpoint exists (ckpt_every sets how often they are written): free "
             "space, then start the run again")
    return CheckpointWriteError(
        f"could not write checkpoint {name} in {str(ck_root)!r}: {reason}; it needs about {_gb(needed)} free and "
        f"the disk has {_gb(free)} free. Its temporaries were removed; {after}")


def _write_files(tmp: Path, step: int, model, ema_state_dict, train_state: dict, config: dict):
    tmp.mkdir(parents=True)
    save_model(tmp / "model.safetensors", model)
    save_model(tmp / "ema.safetensors", model, state_dict=ema_state_dict)
    atomic_write(tmp / "train_state.pt", lambda f: torch.save(train_state, f))
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=1))
    _test_pause("before_manifest", step)
    manifest = {"format": "imm_fast-train-state", "version": 1, "step": step,
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in CKPT_FILES}}
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    fsync_dir(tmp)


def save_checkpoint(run_dir, step: int, model, ema_state_dict, train_state: dict, config: dict, *,
                    keep_last: int = 0, keep_every: int = 0, check_finite: bool = True) -> Path:
    """Write <run_dir>/checkpoints/step-<7-digit step>/ and point `latest` at it; returns the folder.

    Order: model.safetensors, ema.safetensors, train_state.pt, config.json, then manifest.json (sizes + sha256 of
    those four, read back from disk) LAST, all in a temporary sibling; fsync; one rename makes the folder appear
    complete; then `latest`; then retention (prune_checkpoints with keep_last / keep_every). A finished checkpoint
    is never overwritten (if it exists already, it is kept and returned). Non-finite weights are refused
    (NonFiniteError) before anything is written, unless the caller checked them (check_finite=False). A full disk
    or an I/O error is one CheckpointWriteError naming the folder and the space needed; the temporaries go.
    """
    run_dir = Path(run_dir)
    core = getattr(model, "module", model)
    if check_finite:
        bad = _nonfinite((core.state_dict(), ema_state_dict))
        if bad:
            what = "model" if bad[0][0] == 0 else "EMA"
            names = [k for i, k in bad if i == bad[0][0]]
            raise NonFiniteError(f"refusing to write checkpoint {checkpoint_name(step)}: the {what} weights hold NaN "
                                 f"or inf ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    ck_root = run_dir / "checkpoints"
    name = checkpoint_name(step)
    final = ck_root / name
    if final.is_symlink():
        raise CheckpointError(f"{str(final)!r} is a symbolic link: a checkpoint is never written or read through a "
                              "link. Delete it and resume")
    if os.path.lexists(final):
        return final
    tmp = ck_root / f".tmp-{name}-{os.getpid()}"
    needed = 2 * _nbytes(core.state_dict()) + _nbytes(train_state)  # model + EMA + optimizer state
    try:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        ck_root.mkdir(parents=True, exist_ok=True)
        _write_files(tmp, step, model, ema_state_dict, train_state, config)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_failure(e, ck_root, name, needed) if isinstance(e, Exception) else None
        if failure is None:
            raise
        raise failure from e
    _test_pause("before_rename", step)
    os.rename(tmp, final)  # atomic on POSIX: the folder appears complete or not at all
    fsync_dir(ck_root)
    _remember_verified(final)  # its hashes were just read back from disk
    _test_pause("after_rename", step)
    try:
        atomic_write_text(ck_root / "latest", name + "\n")
    except OSError as e:  # the checkpoint is complete; the resolver finds it without `latest`
        raise _write_failure(e, ck_root, "latest", 4096) from e
    fsync_dir(ck_root)
    prune_checkpoints(run_dir, keep_last, keep_every, final)
    return final


# --------------------------------------------------------------------------------------------------------------
# Verifying and listing
# --------------------------------------------------------------------------------------------------------------
_VERIFIED = {}  # (folder, stat of its files) -> None: a checkpoint is hashed once per process, not per lookup


def _stat_key(ck: Path):
    stats = tuple((f, (ck / f).stat().st_size, (ck / f).stat().st_mtime_ns) for f in CKPT_FILES + (MANIFEST,)
                  if (ck / f).is_file())
    return str(ck.resolve()), stats


def _remember_verified(ck: Path):
    _VERIFIED[_stat_key(ck)] = None


def _link_problem(ck: Path) -> "str | None":
    if ck.is_symlink():
        return (f"is a symbolic link (to {excerpt(os.readlink(ck), 80)}): checkpoints are read only from inside "
                "the run's checkpoints/ folder, never through a link")
    for f in CKPT_FILES + (MANIFEST,):
        if (ck / f).is_symlink():
            return f"{f} is a symbolic link: checkpoint files are read only from inside the checkpoint folder"
    return None


def _read_manifest(ck: Path):
    if (ck / MANIFEST).stat().st_size > 1 << 20:
        raise ValueError(f"{MANIFEST} is larger than 1 MB")
    manifest = json.loads((ck / MANIFEST).read_text())
    files = manifest["files"]
    if not isinstance(files, dict) or sorted(files) != sorted(CKPT_FILES):
        raise ValueError(f"it lists {excerpt(files)}, expected {sorted(CKPT_FILES)}")
    return files


def verify_checkpoint(ck, full: bool = True, trust_unverified: bool = False) -> "str | None":
    """None when folder `ck` is a complete checkpoint whose files match its manifest, else the reason (a phrase).

    full=False checks presence and sizes only (no sha256). The manifest is required: save_checkpoint writes it
    before the rename that publishes the folder, so a checkpoint without one was damaged or hand-made;
    trust_unverified=True accepts such a folder when its four files are present (never cached as verified).
    Links (the folder or its files) are refused.
    """
    ck = Path(ck)
    problem = _link_problem(ck)
    if problem:
        return problem
    if not ck.is_dir():
        return "not a folder"
    missing = [f for f in CKPT_FILES if not (ck / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)} (incomplete)"
    if not (ck / MANIFEST).is_file():
        return None if trust_unverified else f"has no {MANIFEST}, so its files cannot be verified; {_TRUST_HINT}"
    key = _stat_key(ck)
    if key in _VERIFIED:
        return None
    try:
        files = _read_manifest(ck)
        for f, want in files.items():
            size = (ck / f).stat().st_size
            if size != want["bytes"]:
                return f"{f} has {size} bytes, its manifest says {excerpt(want['bytes'])} (corrupt or truncated)"
            if full and file_sha256(ck / f) != want["sha256"]:
                return f"{f} does not match its sha256 in {MANIFEST} (corrupt)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {excerpt(str(e), 100)}) (corrupt)"
    if full:
        _VERIFIED[key] = None
    return None


def list_checkpoints(ck_root) -> list:
    """Names of the step-<digits> entries in a checkpoints/ folder (links included, so that the resolver can
    say why it skips them), newest (highest step) first."""
    ck_root = Path(ck_root)
    if not ck_root.is_dir():
        return []
    names = [p.name for p in ck_root.iterdir() if _CKPT_NAME.fullmatch(p.name) and (p.is_dir() or p.is_symlink())]
    return sorted(names, key=_step_of, reverse=True)


def read_latest(ck_root) -> "str | None":
    """The checkpoint name in <ck_root>/latest (None without one): the place `latest` is read. It must be a
    small regular file (not a link) naming a folder inside ck_root: an absolute path, a `..` or any other path is
    refused (a resume would otherwise write into another run), and the message quotes at most a short excerpt."""
    latest = Path(ck_root) / "latest"
    if latest.is_symlink():
        raise ValueError(f"{str(latest)!r} is a symbolic link (to {excerpt(os.readlink(latest), 80)}); `latest` must "
                         f"be a file naming a checkpoint inside {str(ck_root)!r}: refusing to follow it. Fix or "
                         "delete the file")
    if not os.path.lexists(latest):
        return None
    if not latest.is_file():
        raise ValueError(f"{str(latest)!r} is not a regular file: refusing to follow it. Fix or delete it")
    with open(latest, "rb") as f:
        raw = f.read(65)
    text = raw.decode("utf-8", "replace").strip()
    if len(raw) > 64 or not _CKPT_NAME.fullmatch(text):
        raise ValueError(f"{str(latest)!r} holds {excerpt(text, 40)}, which is not a checkpoint name inside "
                         f"{str(ck_root)!r} (expected {CKPT_PREFIX}<digits>, no path); refusing to follow it. Fix or "
                         "delete the file")
    return text


def _is_checkpoint_folder(p: Path) -> bool:
    return (p / "train_state.pt").is_file() or (p / MANIFEST).is_file() or \
        (bool(_CKPT_NAME.fullmatch(p.name)) and p.parent.name == "checkpoints")


def _is_run_folder(p: Path) -> bool:
    """A run folder or its checkpoints/ folder (no verification)."""
    return (p / "checkpoints").is_dir() or os.path.lexists(p / "latest") or bool(list_checkpoints(p))


def run_folder_of(path) -> Path:
    """The run folder of a run folder, its checkpoints/ folder or one of its checkpoints (nothing is verified)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"resume={str(path)!r} does not exist")
    if _is_checkpoint_folder(p):
        return p.parent.parent
    if (p / "checkpoints").is_dir():
        return p
    if _is_run_folder(p):
        return p.parent
    raise ValueError(f"resume={str(path)!r} is neither a checkpoint folder (with train_state.pt) nor a run folder "
                     "with checkpoints")


# --------------------------------------------------------------------------------------------------------------
# The resolver
# --------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path, full: bool = True, trust_unverified: bool = False):
    """(checkpoint folder, notes): the resolver behind resume, load_official, evaluate and push_to_hub.

    path: a checkpoint folder (it must verify), or a run folder / its checkpoints/ folder: the newest checkpoint
    that is complete and verifies; `latest` is only a cross-check (a kill between the rename of a new checkpoint
    and the update of `latest` leaves it one behind). notes: why another checkpoint than `latest` was chosen.
    full=False skips the sha256 checks; trust_unverified accepts checkpoints without a manifest (verify_checkpoint).
    """
    p = Path(path)
    if not os.path.lexists(p):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if _is_checkpoint_folder(p):
        problem = verify_checkpoint(p, full, trust_unverified)
        if problem:
            raise ValueError(f"checkpoint {str(p)!r} is corrupt, incomplete or unverifiable: {problem}; name its run "
                             "folder to fall back to the newest checkpoint that verifies")
        return p, []
    ck_root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    pointer = read_latest(ck_root)
    names = list_checkpoints(ck_root)
    if not names:
        raise ValueError(f"{str(path)!r} is neither a checkpoint folder (with train_state.pt) nor a run folder with "
                         "checkpoints")
    notes = []
    if pointer is not None and pointer not in names:
        notes.append(f"checkpoints/latest names {pointer}, which does not exist")
    chosen = None
    for name in names:
        problem = verify_checkpoint(ck_root / name, full, trust_unverified)
        if problem is None:
            chosen = name
            break
        notes.append(f"{name} failed verification: {problem}")
    if chosen is None:
        raise ValueError(f"no complete, verified checkpoint in {str(ck_root)!r}: " + "; ".join(notes))
    if pointer in names and _step_of(pointer) < _step_of(chosen):
        notes.append(f"checkpoints/latest names {pointer} but {chosen} is newer and complete (the run stopped "
                     "before updating latest)")
    return ck_root / chosen, notes


def find_checkpoint(path, explain: bool = True, full: bool = True, trust_unverified: bool = False) -> Path:
    """The checkpoint folder to resume or load from (see resolve_checkpoint); a fallback is explained in one
    line on stderr when `explain`."""
    ck, notes = resolve_checkpoint(path, full, trust_unverified)
    if notes and explain:
        print(f"imm_fast: using checkpoint {ck}: " + "; ".join(notes), file=sys.stderr, flush=True)
    return ck


def resolve_weights(path, trust_unverified: bool = False, explain: bool = True) -> Path:
    """The weights file that loading `path` reads: an hf:// address through the Hub cache, a file as it is, a run
    folder / checkpoints/ folder / checkpoint folder through resolve_checkpoint, and in the folder
    ema.safetensors (else model.safetensors). Every command that takes a checkpoint goes through here."""
    from ..hub import missing_file_hint, resolve

    p = Path(resolve(path))  # hf://owner/repo/file -> the Hub cache (downloaded once)
    if not os.path.lexists(p):
        raise FileNotFoundError(f"path={str(path)!r} does not exist{missing_file_hint(path)}")
    if not p.is_dir() and not _is_checkpoint_folder(p):
        return p
    if _is_checkpoint_folder(p) or _is_run_folder(p):
        p = find_checkpoint(p, explain, trust_unverified=trust_unverified)
    for name in ("ema.safetensors", "model.safetensors"):
        if (p / name).is_file():
            return p / name
    raise ValueError(f"path={str(path)!r} is a folder without ema.safetensors or model.safetensors (nor a run folder "
                     "with checkpoints/)")


# --------------------------------------------------------------------------------------------------------------
# Reading, repair and retention
# --------------------------------------------------------------------------------------------------------------
def read_checkpoint(ck):
    """(model state dict, EMA state dict, train state) of a checkpoint folder; corrupt files raise ValueError.
    train_state.pt is size-checked (zip entries, pickle graph) before torch inflates it, and loads with
    weights_only=True: no code runs when a checkpoint is read."""
    from safetensors.torch import load_file

    ck = Path(ck)
    check_torch_zip(ck / "train_state.pt")
    try:
        state = torch.load(ck / "train_state.pt", map_location="cpu", weights_only=True)
        model_sd = load_file(str(ck / "model.safetensors"))
        ema_sd = load_file(str(ck / "ema.safetensors"))
    except Exception as e:
        raise ValueError(f"checkpoint {str(ck)!r} is unreadable or corrupt ({type(e).__name__}: "
                         f"{excerpt(str(e), 200)})") from e
    return model_sd, ema_sd, state


def repair_run_folder(run_dir, chosen: Path) -> list:
    """With the run lock held, after resume chose `chosen`: remove stale temporaries (.tmp-step-* folders,
    .deleting-step-* folders of an interrupted retention and atomic-write leftovers), move checkpoints newer than
    `chosen` (they failed verification) aside to corrupt-step-* (kept for inspection, never deleted), and point
    `latest` at `chosen`. Returns what was done."""
    ck_root = Path(run_dir) / "checkpoints"
    done = []
    stale = sorted(ck_root.glob(f".tmp-{CKPT_PREFIX}*")) + sorted(ck_root.glob(f"{_DELETING}{CKPT_PREFIX}*")) + \
        sorted(ck_root.glob(".*.tmp")) + sorted(Path(run_dir).glob(".*.tmp"))
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if stale:
        done.append(f"removed {len(stale)} stale temporar{'y' if len(stale) == 1 else 'ies'} of a killed run "
                    f"({', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''})")
    for name in list_checkpoints(ck_root):
        if Path(chosen).parent == ck_root and _step_of(name) > _step_of(chosen.name):
            aside = ck_root / f"corrupt-{name}"
            n = 1
            while os.path.lexists(aside):
                aside, n = ck_root / f"corrupt-{name}.{n}", n + 1
            os.rename(ck_root / name, aside)
            done.append(f"moved {name} (it does not verify) aside to {aside.name}")
    if Path(chosen).parent == ck_root:
        try:
            pointer = read_latest(ck_root)
        except ValueError:
            pointer = None
        if pointer != chosen.name:
            if (ck_root / "latest").is_symlink():
                (ck_root / "latest").unlink()  # replace the link itself, never write through it
            atomic_write_text(ck_root / "latest", chosen.name + "\n")
            done.append(f"pointed latest at {chosen.name}")
    return done


def checkpoints_to_delete(names: list, keep_last: int, keep_every: int, protected: set) -> list:
    """Retention: of `names` (newest first), those neither among the keep_last newest, nor at a step that is a
    multiple of keep_every, nor `protected`; oldest first. keep_last=0 keeps everything."""
    if not keep_last:
        return []
    keep = set(names[:keep_last]) | set(protected)
    if keep_every:
        keep |= {n for n in names if _step_of(n) % keep_every == 0}
    return [n for n in reversed(names) if n not in keep]


def _remove_folder(folder: Path, step: int):
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
        if i == 0:
            _test_pause("during_prune", step)
    folder.rmdir()


def prune_checkpoints(run_dir, keep_last: int, keep_every: int, newest: Path) -> list:
    """Delete the checkpoints retention does not keep (checkpoints_to_delete), only once `newest` is complete
    and verifies; the checkpoint `latest` names and the newest verified one are never deleted, nor links. Each
    is renamed to .deleting-<name> before its files go, so a kill mid-way leaves a folder that resume cleans up
    (repair_run_folder) and never a half checkpoint. Returns the deleted names."""
    ck_root = Path(run_dir) / "checkpoints"
    if not keep_last or verify_checkpoint(newest) is not None:
        return []
    names = [n for n in list_checkpoints(ck_root) if not (ck_root / n).is_symlink()]
    try:
        pointer = read_latest(ck_root)
    except ValueError:
        return []  # a damaged `latest`: delete nothing until resume has repaired it
    protected = {newest.name} | ({pointer} if pointer else set())
    names = [n for n in names if _step_of(n) <= _step_of(newest.name)]
    doomed = checkpoints_to_delete(names, keep_last, keep_every, protected)
    for name in doomed:
        trash = ck_root / f"{_DELETING}{name}"
        os.rename(ck_root / name, trash)
        fsync_dir(ck_root)
        _remove_folder(trash, _step_of(newest.name))
    return doomed
