"""Optional logging backends beside metrics.jsonl: TensorBoard and Weights & Biases (rank 0 only, off by default).

`LogBackends(cfg.log, run_dir, config_dict, resume_step)` opens what the config asks for; `scalars(step, record)`
logs every finite number of a metrics record (nested dicts such as evaluations become "eval/1step/fd"),
`image(step, tag, grid)` a uint8 HxWxC sample grid. Neither library is a dependency of imm_fast: asking for one that
is not installed is a clear error at start, never hours in. W&B's own settings (WANDB_MODE=offline, WANDB_DIR,
WANDB_API_KEY) are respected because wandb reads them itself; a resumed run continues the same W&B run (its id is
kept in the run folder) and TensorBoard drops the events a killed run wrote after the checkpoint it resumes from.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


def flatten_numbers(record: dict, prefix: str = "") -> dict:
    """{"loss": 0.1, "eval": {"1step": {"fd": 2.0}}, "note": "x"} -> {"loss": 0.1, "eval/1step/fd": 2.0}: finite
    numbers only (bools, strings, None and NaN/inf are left to metrics.jsonl)."""
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = v
    return out


def _require(module: str, extra: str, key: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{key} needs the {module!r} package: pip install 'imm_fast[{extra}]' (or pip install "
                          f"{extra}), or turn it off") from None


class LogBackends:
    """TensorBoard / W&B writers of one run (construct on rank 0 only)."""

    def __init__(self, log_cfg, run_dir: Path, config: Optional[dict] = None, resume_step: Optional[int] = None):
        self.tb = None
        self.wandb_run = None
        run_dir = Path(run_dir)
        if log_cfg.tensorboard:
            _require("tensorboard", "tensorboard", "log.tensorboard=true")
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what a killed run logged after its checkpoint (steps > resume_step).
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        if log_cfg.wandb:
            wandb = _require("wandb", "wandb", f"log.wandb={log_cfg.wandb!r}")
            self._wandb = wandb
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            self.wandb_run = wandb.init(project=log_cfg.wandb, name=run_dir.name, id=run_id, resume="allow",
                                        dir=str(run_dir), config=config or {})
            if not id_file.is_file():
                from ._files import atomic_write

                atomic_write(id_file, lambda f: Path(f).write_text(run_id + "\n"))

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb_run is not None

    def scalars(self, step: int, record: dict):
        values = flatten_numbers({k: v for k, v in record.items() if k != "step"})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None and values:
            self.wandb_run.log(values, step=step)

    def image(self, step: int, tag: str, grid):
        """grid: a uint8 array or tensor of shape (H, W, C) with C in {1, 3}."""
        import numpy as np

        grid = np.asarray(grid.cpu() if hasattr(grid, "cpu") else grid)
        if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[-1] not in (1, 3):
            raise ValueError(f"grid must be uint8 (H, W, 1|3), got {grid.dtype} {tuple(grid.shape)}")
        if self.tb is not None:
            self.tb.add_image(tag, grid, step, dataformats="HWC")
        if self.wandb_run is not None:
            self.wandb_run.log({tag: self._wandb.Image(grid)}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
