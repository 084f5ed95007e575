"""Checkpoints on the Hugging Face Hub: `hf://<owner>/<repo>[@<revision>]/<path in repo>`.

The authors publish their three released checkpoints in the Hub model repository `lumaai/imm`
(RELEASED lists them). `resolve(path)` turns an hf:// address into a local file through huggingface_hub's own
download-and-cache (so HF_HOME / HF_HUB_CACHE, local cache hits and HF_HUB_OFFLINE=1 behave as in every other
Hub client); any other path is returned unchanged. The file is then read like a local one (for pickles: the
restricted unpickler of imm_fast.checkpoint, never the stored code). huggingface_hub is an optional extra
(`pip install 'imm_fast[hub]'`).
"""
from __future__ import annotations

import os
from pathlib import Path

SCHEME = "hf://"
OFFICIAL_REPO = "lumaai/imm"
# The authors' released checkpoints (lumalabs/imm README) and what each is.
RELEASED = {
    "imagenet256_ts_a2.pkl": "ImageNet-256, DiT-XL/2, euler_fm + stride time embedding, a = 2 (FID 1.99 at 8 steps, "
                             "guidance 1.5)",
    "imagenet256_s_a1.pkl": "ImageNet-256, DiT-XL/2, euler_fm + identity (s) time embedding, a = 1",
    "cifar10.pkl": "CIFAR-10 unconditional, DDPM++ UNet, simple_edm + identity (FID 3.20 at 1 step, 1.98 at 2)",
}


def is_hub_path(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def parse(path: str):
    """'hf://owner/repo@rev/dir/file.pkl' -> ('owner/repo', 'dir/file.pkl', 'rev' or None)."""
    rest = path[len(SCHEME):]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"checkpoint {path!r} must look like hf://<owner>/<repo>[@<revision>]/<file>, e.g. "
                         f"{SCHEME}{OFFICIAL_REPO}/imagenet256_ts_a2.pkl")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(path):
    """A local file for `path`: hf:// addresses are downloaded (or found in the Hub cache); others pass through."""
    if not is_hub_path(path):
        return path
    repo_id, filename, revision = parse(path)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ImportError(f"reading {path!r} needs huggingface_hub: pip install 'imm_fast[hub]' (or "
                          "pip install huggingface_hub), or download the file and pass its local path") from None
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=_offline())
    except hub_errors.LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise FileNotFoundError(f"{path!r} is not in the local Hugging Face cache and {how}: run once with network "
                                f"access (or `huggingface-cli download {repo_id} {filename}`), or pass a local path"
                                ) from None
    except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{path!r}: no Hub repository {repo_id!r} (or it is private: log in with "
                                "`huggingface-cli login`)") from None
    except (hub_errors.EntryNotFoundError, hub_errors.RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{path!r}: {type(e).__name__}: {filename!r} at revision {revision or 'main'} of "
                                f"{repo_id!r} does not exist") from None


def missing_file_hint(path) -> str:
    """For a local path that does not exist: where the file lives when it is one of the released checkpoints."""
    name = Path(os.fspath(path)).name
    if name in RELEASED:
        return (f"; {name} is the authors' released checkpoint ({RELEASED[name]}): load it from the Hub as "
                f"'{SCHEME}{OFFICIAL_REPO}/{name}' (needs huggingface_hub) or download it from "
                f"the Hub model repository {OFFICIAL_REPO}")
    return ""
