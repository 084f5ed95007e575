"""Checkpoints on the Hugging Face Hub: `hf://<owner>/<repo>[@<revision>]/<path in repo>`.

The authors publish their three released checkpoints in the Hub model repository `lumaai/imm`
(RELEASED lists them). `resolve(path)` turns an hf:// address into a local file through huggingface_hub's own
download-and-cache (so HF_HOME / HF_HUB_CACHE, local cache hits and HF_HUB_OFFLINE=1 behave as in every other
Hub client); any other path is returned unchanged. The file is then read like a local one (for pickles: the
restricted unpickler of imm_fast.checkpoint, never the stored code). huggingface_hub is an optional extra
(`pip install 'imm_fast[hub]'`).
"""
from __future__ import annotations

import json
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
        lines += ["## Metrics at the end of training", "", "| metric | value |", "|---|---|", *rows, ""]
    if nested:
        lines += ["```json", json.dumps(nested, indent=1), "```", ""]
    return "\n".join(lines)


def push_to_hub(run, repo_id: str, *, private: bool = False, token=None, commit_message=None) -> str:
    """Upload a run's EMA weights (`ema.safetensors`), its config and a model card to the Hub repo `repo_id`.

    run: a run folder or a checkpoint folder (the newest verified checkpoint of a run is used). Returns the
    commit URL. The uploaded file loads back with load_official("hf://<repo_id>/ema.safetensors").
    """
    import shutil
    import tempfile

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id={repo_id!r} must look like '<owner>/<name>'")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'imm_fast[hub]'") from None
    ck = _checkpoint_folder(run)
    config = json.loads((ck / "config.json").read_text())
    final = ck.parent.parent / "final_metrics.json"
    metrics = json.loads(final.read_text()) if final.is_file() else {}
    step = int(ck.name.rsplit("-", 1)[-1]) if ck.name.rsplit("-", 1)[-1].isdigit() else 0
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imm_fast-push-") as stage:
        stage = Path(stage)
        shutil.copy2(ck / "ema.safetensors", stage / "ema.safetensors")
        (stage / "config.json").write_text(json.dumps(config, indent=1))
        (stage / "README.md").write_text(model_card(repo_id, config, metrics, step))
        info = api.upload_folder(repo_id=repo_id, folder_path=str(stage),
                                 commit_message=commit_message or f"imm_fast: EMA weights at step {step}")
    return str(getattr(info, "commit_url", info))


def _checkpoint_folder(run) -> Path:
    from .checkpoint import find_checkpoint

    ck = find_checkpoint(run)  # the newest complete, verified checkpoint
    if not (ck / "ema.safetensors").is_file():
        raise FileNotFoundError(f"{str(ck)!r} has no ema.safetensors")
    return ck
