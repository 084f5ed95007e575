"""Checkpoints on the Hugging Face Hub: `hf://<owner>/<repo>[@<revision>]/<path in repo>`.

The authors publish their three released checkpoints in the Hub model repository `lumaai/imm`
(RELEASED lists them). `resolve(path)` turns an hf:// address into a local file through huggingface_hub's own
download-and-cache (so HF_HOME / HF_HUB_CACHE, local cache hits and HF_HUB_OFFLINE=1 behave as in every other
Hub client); any other path is returned unchanged. When HF_HUB_OFFLINE is not set but the Hub's host does not
answer (a machine without network), the cache is read at once instead of waiting through huggingface_hub's
retries. `upload_checkpoint` stages one checkpoint's EMA weights, its config and a model card and uploads them.
This module sits below the checkpoint loader: it resolves and uploads files and never reads a checkpoint
(imm_fast.checkpoints.push_to_hub chooses what to upload). huggingface_hub is an optional extra
(`pip install 'imm_fast[hub]'`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

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


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable(endpoint: str, timeout: float = 3.0) -> "str | None":
    """None when the Hub's host accepts a connection (or a proxy is configured: then the Hub client decides),
    else why not, in a few words. One connection attempt of at most `timeout` s, instead of the client's retries."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    why = {}

    def probe():  # in a thread: a name lookup can hang past any socket timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            why["reason"] = f"{host} did not answer: {e.strerror or type(e).__name__}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return f"{host} did not answer within {timeout:g} s" if t.is_alive() else why.get("reason")


def resolve(path):
    """A local file for `path`: hf:// addresses are downloaded (or found in the Hub cache); others pass through."""
    if not is_hub_path(path):
        return path
    repo_id, filename, revision = parse(path)
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ImportError(f"reading {path!r} needs huggingface_hub: pip install 'imm_fast[hub]' (or "
                          "pip install huggingface_hub), or download the file and pass its local path") from None
    why = None if _offline() else unreachable(hub_constants.ENDPOINT)
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                               local_files_only=_offline() or why is not None)
    except hub_errors.LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if _offline() else f"the Hub could not be reached ({why or 'no answer'})"
        rev = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(f"{path!r} is not in the local Hugging Face cache and {how}: run once with network "
                                f"access (or `hf download {repo_id} {filename}{rev}`), or pass a local path"
                                ) from None
    except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{path!r}: no Hub repository {repo_id!r} (or it is private: log in with "
                                "`hf auth login`)") from None
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


def model_card(repo_id: str, config: dict, metrics: dict, step: int) -> str:
    """A Hub model card (README.md) for a run's EMA weights: front matter, what it is, how to load, metrics."""
    model, loss = config.get("model", {}), config.get("loss", {})
    rows = [f"| {k} | {json.dumps(v)} |" for k, v in sorted(metrics.items()) if not isinstance(v, (dict, list))]
    nested = {k: v for k, v in metrics.items() if isinstance(v, (dict, list))}
    lines = [
        "---", "library_name: imm_fast", "tags:", "- inductive-moment-matching", "- few-step-generation",
        "- image-generation", "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"An Inductive Moment Matching (IMM) model trained with imm_fast ({config.get('name', '?')} config, "
        f"{step} optimizer steps): {model.get('img_resolution')}x{model.get('img_resolution')}x"
        f"{model.get('img_channels')} inputs, {model.get('label_dim') or 'no'} classes, f_type "
        f"{model.get('f_type')}, temb_type {model.get('temb_type')}, M = {loss.get('group_size')} particles per "
        "group. The weights are the EMA weights.", "",
        "```python", "import torch, imm_fast",
        f'model = imm_fast.load_official("hf://{repo_id}/ema.safetensors")',
        "noise = torch.randn(16, model.img_channels, model.img_resolution, model.img_resolution) * model.sigma_data",
        "x = imm_fast.sample(model, noise, steps=2)", "```", "",
        "`config.json` holds the full training config.", "",
    ]
    if rows:
        lines += [f"## Metrics at step {step}", "", "| metric | value |", "|---|---|", *rows, ""]
    if nested:
        lines += ["```json", json.dumps(nested, indent=1), "```", ""]
    return "\n".join(lines)


def check_repo_id(repo_id):
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id={repo_id!r} must look like '<owner>/<name>'")


def upload_checkpoint(repo_id: str, weights, config: dict, metrics: dict, step: int, *, private: bool = False,
                      token=None, commit_message=None) -> str:
    """Upload `weights` (an EMA safetensors file) as ema.safetensors, `config` as config.json and a model card of
    `metrics` at `step` to the Hub repo `repo_id`; returns the commit URL."""
    import shutil
    import tempfile

    check_repo_id(repo_id)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'imm_fast[hub]'") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imm_fast-push-") as stage:
        stage = Path(stage)
        shutil.copy2(weights, stage / "ema.safetensors")
        (stage / "config.json").write_text(json.dumps(config, indent=1))
        (stage / "README.md").write_text(model_card(repo_id, config, metrics, step))
        info = api.upload_folder(repo_id=repo_id, folder_path=str(stage),
                                 commit_message=commit_message or f"imm_fast: EMA weights at step {step}")
    return str(getattr(info, "commit_url", info))
