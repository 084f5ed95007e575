"""push_to_hub: upload the checkpoint the resolver chooses, with a model card of THAT checkpoint's metrics."""
from __future__ import annotations

import json
from pathlib import Path

from .. import hub
from .training_state import CKPT_PREFIX, _CKPT_NAME, find_checkpoint

MAX_METRICS_LINE = 1 << 20  # a metrics.jsonl line longer than this is skipped, not parsed


def checkpoint_metrics(run_dir, step: int) -> dict:
    """The evaluation logged at `step` in <run_dir>/metrics.jsonl (the last one at that step), or {}: metrics of
    a later step (a newer checkpoint that failed verification) never describe this one."""
    path = Path(run_dir) / "metrics.jsonl"
    found = {}
    if not path.is_file() or path.is_symlink():
        return found
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(line) > MAX_METRICS_LINE or '"eval"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step") == step and isinstance(rec.get("eval"), dict):
                found = rec["eval"]
    return found


def push_to_hub(run, repo_id: str, *, private: bool = False, token=None, commit_message=None,
                trust_unverified: bool = False) -> str:
    """Upload a run's EMA weights (`ema.safetensors`), its config and a model card to the Hub repo `repo_id`.

    run: a run folder (its newest verified checkpoint, as resume and load_official choose it) or a checkpoint
    folder. The model card holds the metrics logged at that checkpoint's step. Returns the commit URL. The
    uploaded file loads back with load_official("hf://<repo_id>/ema.safetensors").
    """
    hub.check_repo_id(repo_id)
    ck = find_checkpoint(run, trust_unverified=trust_unverified)
    if not (ck / "ema.safetensors").is_file():
        raise FileNotFoundError(f"{str(ck)!r} has no ema.safetensors")
    config = json.loads((ck / "config.json").read_text())
    step = int(ck.name[len(CKPT_PREFIX):]) if _CKPT_NAME.fullmatch(ck.name) else 0
    metrics = checkpoint_metrics(ck.parent.parent, step)
    return hub.upload_checkpoint(repo_id, ck / "ema.safetensors", config, metrics, step, private=private,
                                 token=token, commit_message=commit_message)
