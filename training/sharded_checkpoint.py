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

import copy
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict
from torch.optim import Optimizer

from padst_compiler.training.scheduler import DSTScheduler


def _state(model: nn.Module, optimizer: Optimizer, scheduler: DSTScheduler) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}


def _check_fits(checkpoint, saved: dict, model: nn.Module, scheduler: DSTScheduler) -> None:
    """Every model entry saved with its shape, and a scheduler saved with the same options."""
    for key, value in get_model_state_dict(model).items():
        entry = saved.get(f"model.{key}")
        size = getattr(entry, "size", None)
        if entry is None or (torch.is_tensor(value) and size is not None and tuple(size) != tuple(value.shape)):
            found = "no entry" if entry is None else f"shape {tuple(size)}"
            raise ValueError(f"load_sharded: {checkpoint} has {found} for {key!r} (the model has "
                             f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}); "
                             "nothing was loaded")
    if "scheduler.step" not in saved:
        raise ValueError(f"load_sharded: {checkpoint} holds no PA-DST scheduler state; nothing was loaded")
    options = {"scheduler": copy.deepcopy(scheduler.state_dict())}
    dcp.load(options, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    scheduler.check_state_dict(options["scheduler"])


def save_sharded(checkpoint: str | Path, model: nn.Module, optimizer: Optimizer, scheduler: DSTScheduler) -> None:
    """Write the run's state to the folder ``checkpoint`` (every rank calls it)."""
    dcp.save(_state(model, optimizer, scheduler), checkpoint_id=checkpoint)


def load_sharded(checkpoint: str | Path, model: nn.Module, optimizer: Optimizer, scheduler: DSTScheduler) -> int:
    """Restore a ``save_sharded`` checkpoint into a freshly built run (every rank calls it);
    returns the scheduler's step, the step to continue from."""
    saved = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    _check_fits(checkpoint, saved, model, scheduler)  # before anything is loaded: a refusal changes nothing
    state = _state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    states = state["optimizer"]["state"]
    for name in [name for name in states if not any(key.startswith(f"optimizer.state.{name}.") for key in saved)]:
        del states[name]  # idle when the checkpoint was written: it starts without state, as it did then
    # strict=False lets those parameters go without state; the model was checked complete above
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    scheduler.load_state_dict(state["scheduler"])
    return scheduler.step_count
