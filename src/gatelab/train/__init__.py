"""Training: a resumable trainer, safetensors + JSON checkpoints, schedules and run logs.

See :class:`Trainer` for the protocols a model and its data follow, and
:mod:`gatelab.train.checkpoint` for what a checkpoint holds and how it is written.

Modules: ``trainer`` (the loop), ``config`` (TrainConfig, TrainResult), ``protocols`` (what a
model and its batches provide; AdamW groups), ``stopping`` (Ctrl-C, time budget), ``rundir``
(run-directory checks and logs), ``metrics`` (JSONL, TensorBoard, the tqdm bar),
``checkpoint`` (files), ``state`` (RNG, config fingerprint, the tensors/JSON split),
``sharded`` (expert banks of an expert-parallel run), ``schedule``, ``evaluate``, ``loop``
(the small loop of fits that keep no checkpoints).
"""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    config_diff,
    config_fingerprint,
    find_checkpoints,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .loop import train_loop
from .metrics import JsonlLog, Progress, TensorBoardLog, read_jsonl, truncate_jsonl
from .schedule import WarmupCosine, warmup_cosine
from .trainer import (
    ResumableIterator,
    TrainConfig,
    Trainer,
    TrainError,
    TrainResult,
    count_tokens,
    moe_aux_loss,
    param_groups,
    train,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "JsonlLog",
    "Progress",
    "ResumableIterator",
    "TensorBoardLog",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "train_loop",
    "config_diff",
    "config_fingerprint",
    "count_tokens",
    "find_checkpoints",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "moe_aux_loss",
    "param_groups",
    "prune_checkpoints",
    "read_checkpoint",
    "read_jsonl",
    "save_checkpoint",
    "set_rng_state",
    "train",
    "truncate_jsonl",
    "warmup_cosine",
]
