"""Checkpoints, split by job (each module imports only those before it in this list):

  safe_pickle     the restricted unpickler and the caps around hostile files (object-graph size and depth of a
                  pickle, zip expansion of a torch.save archive, tensor bytes against the file's size)
  official        the authors' released pickles: inert records of their modules, never their code
  native          imm_fast's own weights format (safetensors with the init kwargs in its metadata)
  training_state  training checkpoints: write (manifest last, retention after), verify, list, the resolver
                  (resolve_checkpoint / resolve_weights, the reader of `latest`), repair after a kill
  loading         load_official: the resolver, then a table of loaders by file kind
  lock            RunLock: one writer per run folder
  publish         push_to_hub: the resolved checkpoint and its own metrics to the Hugging Face Hub
"""
from __future__ import annotations

from ..errors import (CheckpointError, CheckpointWriteError, NonFiniteError, RunFolderBusyError,  # noqa: F401
                      UnsafeCheckpointError)
from ..models.stored import build_from_kwargs, infer_model_kwargs  # noqa: F401
from .loading import LOADERS, load_official  # noqa: F401
from .lock import RunLock  # noqa: F401
from .native import FORMAT, save_model  # noqa: F401
from .official import read_official_pickle  # noqa: F401
from .publish import push_to_hub  # noqa: F401
from .safe_pickle import MAX_PICKLE_DEPTH, MAX_PICKLE_NODES, ZIP_EXPANSION, restricted_load  # noqa: F401
from .training_state import (CKPT_FILES, CKPT_PREFIX, MANIFEST, checkpoint_name, find_checkpoint,  # noqa: F401
                             list_checkpoints, nonfinite_entries, prune_checkpoints, read_checkpoint,
                             repair_run_folder, resolve_checkpoint, resolve_weights, run_folder_of,
                             save_checkpoint, verify_checkpoint)
