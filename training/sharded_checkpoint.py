"""Checkpoints of a sharded (FSDP2) PA-DST run through ``torch.distributed.checkpoint``.

``save_sharded`` / ``load_sharded`` keep the model, the optimizer and the scheduler of every
rank in one checkpoint folder. They exist for one PA-DST trait: some parameters sit idle for
part of the run (the sparse values during the dense warm-up, the warm-up weight after
hardening), so the optimizer has no state for them yet when the checkpoint is written, while
``get_state_dict`` on a fresh optimizer creates state for every parameter. A plain
``dcp.load`` then fails on the missing keys, and a partial load would leave those parameters
with a step count the uninterrupted run does not have. ``load_sharded`` loads what was saved
and starts the rest without state, exactly as the saving run would have.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.optim import Optimizer

from padst_compiler.training.scheduler import DSTScheduler


def _state(model: nn.Module, optimizer: Optimizer, scheduler: DSTScheduler) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}


def save_sharded(checkpoint: str | Path, model: nn.Module, optimizer: Optimizer, scheduler: DSTScheduler) -> None:
    """Write the run's state to the folder ``checkpoint`` (every rank calls it)."""
    dcp.save(_state(model, optimizer, scheduler), checkpoint_id=checkpoint)


def load_sharded(checkpoint: str | Path, model: nn.Module, optimizer: Optimizer, scheduler: DSTScheduler) -> int:
    """Restore a ``save_sharded`` checkpoint into a freshly built run (every rank calls it);
    returns the scheduler's step, the step to continue from."""
    saved = set(dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata)
    state = _state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    missing = [key for key in saved if key.startswith("model.")] and \
        [key for key in state["model"] if f"model.{key}" not in saved]
    if missing:
        raise ValueError(f"load_sharded: {checkpoint} has no entry for {missing[0]!r} (and {len(missing) - 1} "
                         "more) of the model; nothing of the model was loaded")
    states = state["optimizer"]["state"]
    for name in [name for name in states if not any(key.startswith(f"optimizer.state.{name}.") for key in saved)]:
        del states[name]  # idle when the checkpoint was written: it starts without state, as it did then
    # strict=False lets those parameters go without state; the model was checked complete above
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    scheduler.load_state_dict(state["scheduler"])
    return scheduler.step_count
