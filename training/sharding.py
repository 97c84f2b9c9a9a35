"""Layers under FSDP2 (``torch.distributed.fsdp.fully_shard``): outside forward and backward
their parameters are DTensors, each rank holding one shard. The scheduler's decisions need
whole tensors: ``whole`` gathers one (a collective: every rank must call it, in the same
order, which the scheduler does), ``assign`` writes a whole value back into this rank's
shard, ``add_gradient`` adds a whole gradient to a parameter's (sharded) gradient. On plain
tensors all three are the ordinary operations.

DTensor is looked up, not imported: a process that never imported it (importing it costs
most of a second) holds no DTensor."""

from __future__ import annotations

import sys

import torch


def is_sharded(tensor: torch.Tensor | None) -> bool:
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _shard_like(value: torch.Tensor, target) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    # every rank holds the same whole value: each cuts its own shard, nothing is sent
    return distribute_tensor(value.detach(), target.device_mesh, target.placements, src_data_rank=None)


def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    if is_sharded(target):
        target.to_local().copy_(_shard_like(value, target).to_local())
    else:
        target.copy_(value)


def add_gradient(param: torch.Tensor, grad: torch.Tensor) -> None:
    if is_sharded(param):
        grad = _shard_like(grad, param)
    param.grad = grad if param.grad is None else param.grad.add_(grad)
