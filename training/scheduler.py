"""``DSTScheduler``: the PA-DST training schedule around any optimizer.

Call order per step::

    loss.backward(); optimizer.step(); sched.step()

The loss needs no extra term: the scheduler adds the gradient of the permutation
penalty to the soft matrices from a hook that runs at the start of ``optimizer.step()``
(after any gradient clipping, so that gradient is never clipped). A loop that still adds
``sched.permutation_penalty()`` to its loss gets the same numbers unless it clips (the hook
sees that the penalty was back-propagated and adds nothing). Of several schedulers on one
optimizer only the newest adds it.

``step()`` ends the dense warm-up of ``"learned"`` layers at ``harden_at`` (10 % of
training by default): their permutation is chosen from the warm-up weight and the
structure fitted to it (``anneal=True`` first shrinks the weights outside the structure
to zero over the warm-up). It keeps ``"birkhoff"`` soft matrices in the Birkhoff polytope
and hardens each one when its penalty falls under the threshold or at ``harden_at`` (the
paper's recipe uses 0.5). Every ``update_every`` steps until ``t_end`` it moves the sparse
masks (drop by magnitude, grow by RigL or SET) without changing any shape. A frozen layer
(``requires_grad_(False)`` on its weights) is left exactly as it is until it trains again.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from padst_compiler.training import dst
from padst_compiler.training.permutation import permutation_penalty, project_to_birkhoff_
from padst_compiler.training.sharding import add_gradient, assign, whole
from padst_compiler.training.sparsify import padst_layers

GROWTH_MODES = ("rigl", "set")


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _innermost(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``: its
    state holds the moments to move and its step runs the penalty hook."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DSTScheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class DSTScheduler:
    """Dynamic sparsity and permutation schedule for the ``PADSTLinear`` layers of a model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, *,
                 update_every: int = 100, drop_fraction: float = 0.3, t_end: float = 0.75,
                 growth: str = "rigl", penalty_weight: float = 1.0, penalty_start: float | None = None,
                 harden_threshold: float = 0.22, harden_at: float = 0.1, sinkhorn_iterations: int = 10,
                 anneal: bool = False, reselect_at: tuple[float, ...] = (0.5, 0.75), seed: int = 0):
        if growth not in GROWTH_MODES:
            raise ValueError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
        for option, value in (("total_steps", total_steps), ("update_every", update_every),
                              ("sinkhorn_iterations", sinkhorn_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}")
        if not 0 <= penalty_weight < math.inf:
            raise ValueError(f"penalty_weight must be a finite number >= 0, got {penalty_weight!r}")
        penalty_start = penalty_weight if penalty_start is None else penalty_start
        if penalty_weight > 0 and not 0 < penalty_start <= penalty_weight:
            raise ValueError(f"penalty_start must be in (0, penalty_weight={penalty_weight}], got {penalty_start!r}")
        if not 0 <= harden_threshold < 1:
            raise ValueError(f"harden_threshold must be in [0, 1) (the penalty is normalised), got {harden_threshold!r}")
        for option, value in (("drop_fraction", drop_fraction), ("t_end", t_end), ("harden_at", harden_at)):
            if not 0 <= value <= 1:
                raise ValueError(f"{option} must be in [0, 1], got {value!r}")
        if not all(0 < fraction < 1 for fraction in reselect_at):
            raise ValueError(f"reselect_at must hold fractions of the warm-up in (0, 1), got {reselect_at!r}")
        self.layers = padst_layers(model)
        if not self.layers:
            raise ValueError("the model has no PADSTLinear layer: call sparsify(model, ...) first")
        self.optimizer = _innermost(optimizer)
        self.options = dict(total_steps=total_steps, update_every=update_every, drop_fraction=drop_fraction,
                            t_end=t_end, growth=growth, penalty_weight=penalty_weight,
                            penalty_start=penalty_start, harden_threshold=harden_threshold,
                            harden_at=harden_at, sinkhorn_iterations=sinkhorn_iterations, anneal=anneal,
                            reselect_at=tuple(reselect_at), seed=seed)
        self.total_steps, self.update_every, self.growth = total_steps, update_every, growth
        self.drop_fraction, self.seed = drop_fraction, seed
        self.end_step = int(t_end * total_steps)
        self.harden_step = int(harden_at * total_steps)
        self.penalty_weight, self.penalty_start = penalty_weight, penalty_start
        self.harden_threshold, self.sinkhorn_iterations = harden_threshold, sinkhorn_iterations
        self.anneal = anneal
        self.reselect_steps = {round(self.harden_step * fraction) for fraction in reselect_at} - {0}
        self.step_count = 0
        self._penalty_backpropagated = False
        self._arm_gradient_capture()
        self._arm_penalty_gradient(self.optimizer)

    # ------------------------------------------------------------------ permutations

    def _soft_layers(self) -> list[nn.Module]:
        """The still-soft layers the schedule moves: a frozen layer (no weight trains) keeps
        its permutation, warm-up, soft matrix and mask until it trains again. (``soft`` is
        tested first: after hardening, a step checks no layer for being frozen.)"""
        return [layer for _, layer in self.layers if layer.soft and not layer.frozen]

    def current_penalty_weight(self) -> float:
        """Geometric ramp from ``penalty_start`` to ``penalty_weight`` over the soft phase: weak
        at first so the matrix can fit the task, strong at the end so it reaches a vertex."""
        if self.penalty_weight == 0:
            return 0.0
        progress = min(1.0, self.step_count / max(self.harden_step, 1))
        return self.penalty_start * (self.penalty_weight / self.penalty_start) ** progress

    def _soft_matrices(self) -> list[nn.Parameter]:
        return [layer.soft_perm for layer in self._soft_layers() if layer.soft_perm is not None]

    def permutation_penalty(self) -> torch.Tensor:
        """``lambda * sum`` of the normalised penalties of the still-soft layers.

        The scheduler applies its gradient by itself; adding this to the loss is optional
        and counted once (a back-propagated penalty tells the optimizer hook to skip)."""
        soft = self._soft_matrices()
        if not soft:
            return torch.zeros((), device=self.layers[0][1].values.device)
        # whole(): under FSDP2 the matrices are sharded here; gathering them is differentiable
        penalty = self.current_penalty_weight() * torch.stack([permutation_penalty(whole(m)) for m in soft]).sum()
        if penalty.requires_grad:
            penalty.register_hook(self._note_penalty_backpropagated)
        return penalty

    def _note_penalty_backpropagated(self, grad: torch.Tensor) -> None:
        self._penalty_backpropagated = True

    def _arm_penalty_gradient(self, optimizer) -> None:
        """Hook ``add_penalty_gradient`` in front of the optimizer's step. The hook holds the
        scheduler weakly and is removed with it; a scheduler replaced by a newer one on the
        same optimizer adds nothing even while it lives."""
        scheduler = weakref.ref(self)
        optimizer._padst_penalty_scheduler = scheduler  # a newer scheduler takes over from this one

        def before_step(optimizer, args, kwargs):
            live = scheduler()
            if live is not None and getattr(optimizer, "_padst_penalty_scheduler", None) is scheduler:
                live.add_penalty_gradient()

        weakref.finalize(self, optimizer.register_step_pre_hook(before_step).remove)

    def add_penalty_gradient(self) -> None:
        """Add ``d(permutation_penalty) / dM`` to the soft matrices' gradients, unless the
        loss of this step already carried the penalty. Runs before each optimizer step."""
        if self._penalty_backpropagated:
            self._penalty_backpropagated = False
            return
        soft = self._soft_matrices()
        if not soft or self.penalty_weight == 0:
            return
        copies = [whole(matrix).detach().requires_grad_() for matrix in soft]
        with torch.enable_grad():
            penalty = self.current_penalty_weight() * sum(permutation_penalty(copy) for copy in copies)
            grads = torch.autograd.grad(penalty, copies)
        for matrix, grad in zip(soft, grads):
            add_gradient(matrix, grad)

    @torch.no_grad()
    def _keep_soft_permutations_feasible(self) -> None:
        for layer in self._soft_layers():
            if layer.soft_perm is not None:
                matrix = whole(layer.soft_perm).clone()
                assign(layer.soft_perm, project_to_birkhoff_(matrix, self.sinkhorn_iterations))

    def _warmup_step(self) -> None:
        """During the dense warm-up (steps 1 to T, the hardening step): average each weight over
        the second half (the permutation is chosen from that mean), re-choose learned
        permutations at the ``reselect_at`` fractions of T (each
        selection starts from the one before) and, with ``anneal``, shrink the weights outside
        the structure so that what is left of them falls as ``1 - (t / T)**3`` to zero at T:
        slowly at first, while the dense weight still decides which units matter, fully by
        the end, so hardening changes the function little."""
        step, end = self.step_count, self.harden_step
        if step > end:
            return
        sample = step - end // 2
        left = lambda t: 1 - (t / end) ** 3  # noqa: E731
        for layer in self._soft_layers():
            if sample >= 1:
                layer.average_warmup_weight(sample)
            if step == end:
                continue
            if step in self.reselect_steps:
                layer.reselect_permutation()
            if self.anneal:
                layer.anneal_toward_structure(left(step) / left(step - 1))

    @torch.no_grad()
    def _harden_due(self) -> None:
        for layer in self._soft_layers():
            below_threshold = layer.soft_perm is not None and float(layer.penalty()) < self.harden_threshold
            if self.step_count >= self.harden_step or below_threshold:
                layer.harden()
                self._forget_optimizer_state(layer, keep_bias=layer.side == "input")

    def _forget_optimizer_state(self, layer, keep_bias: bool) -> None:
        """Drop the optimizer state hardening made stale: the refitted values (moments of the old
        slots would push the new weights in stale directions), the permuted bias, and the freed
        warm-up weight or soft matrix. Dropping the whole state (step count included) lets Adam
        restart its bias correction instead of taking oversized steps on zeroed moments."""
        stale = [layer.values, layer.soft_perm, layer.dense_weight_proxy] + ([] if keep_bias else [layer.bias])
        for param in stale:
            if param is not None:
                self.optimizer.state.pop(param, None)

    # --------------------------------------------------------------------- sparsity

    def _update_due(self, step: int) -> bool:
        return step % self.update_every == 0 and step < self.end_step and self.drop_fraction > 0

    def _arm_gradient_capture(self) -> None:
        due = self.growth == "rigl" and self._update_due(self.step_count + 1)
        for _, layer in self.layers:
            capture = due and not layer.warming_up and not layer.frozen
            layer.capture_dense_grad = capture
            if not capture:
                layer.dense_grad = None

    def _grow_scores(self, position: int, layer, mask_shape) -> torch.Tensor:
        if self.growth == "set":
            gen = torch.Generator().manual_seed(hash((self.seed, self.step_count, position)) & 0x7FFFFFFF)
            return torch.rand(mask_shape, generator=gen).to(layer.values.device)
        grad = layer.dense_grad
        if _distributed_world() > 1:  # every rank must grow the same units
            torch.distributed.all_reduce(grad)
            grad = grad / _distributed_world()
        return layer.structure.unit_scores(grad.float().square())

    def _drop_counts(self, step: int, skip: set[str]) -> dict[str, int]:
        """Units each layer drops at ``step`` (layers in ``skip`` and layers dropping none left out)."""
        fraction = dst.drop_fraction_at(step, self.drop_fraction, self.end_step)
        counts = {}
        for name, layer in self.layers:
            if name not in skip and not layer.frozen:
                kept = int(layer.structure.index_to_units(layer.index, layer.out_features, layer.in_features).sum())
                if round(fraction * kept):
                    counts[name] = round(fraction * kept)
        return counts

    def _check_update_inputs(self, drop_counts: dict[str, int]) -> None:
        """Refuse an update that cannot run before anything (masks, step count) has moved."""
        if self.growth != "rigl":
            return
        for name, layer in self.layers:
            if name in drop_counts and layer.dense_grad is None:
                raise RuntimeError(f"layer {name!r}: no dense gradient was captured for the RigL update at step "
                                   f"{self.step_count + 1}; call sched.step() once after every optimizer.step(), "
                                   "with a backward pass through the model in between. Nothing was changed")

    @torch.no_grad()
    def _update_masks(self, drop_counts: dict[str, int]) -> None:
        """Drop and grow ``drop_counts[name]`` units in each layer named there: every new mask
        is planned before any layer, its values or its optimizer state is moved."""
        planned = []
        for position, (name, layer) in enumerate(self.layers):
            if name not in drop_counts:
                continue
            structure, out_features, in_features = layer.structure, layer.out_features, layer.in_features
            scores = self._grow_scores(position, layer, structure.index_to_units(
                layer.index, out_features, in_features).shape)
            new_mask, survivors = dst.plan_update(structure, whole(layer.values), layer.index, out_features,
                                                  in_features, drop_counts[name], scores)
            new_index = structure.units_to_index(new_mask, out_features, in_features)
            keep = structure.units_to_dense(survivors, out_features, in_features)
            moved = [layer.values] + [state for state in self.optimizer.state.get(layer.values, {}).values()
                                      if torch.is_tensor(state) and state.shape == layer.values.shape]
            planned.append((layer, new_index, [(tensor, dst.remap(structure, whole(tensor), layer.index, new_index,
                                                                  keep, out_features, in_features))
                                               for tensor in moved]))
        for layer, new_index, remapped in planned:
            for tensor, value in remapped:
                assign(tensor, value)
            layer.index.copy_(new_index)
            layer.dense_grad = None  # consumed: the next update captures afresh

    # ------------------------------------------------------------------------ step

    def step(self) -> None:
        """Advance one training step; call right after ``optimizer.step()``."""
        # layers whose sparse weight was not in use during this step (fitted to the warm-up
        # weight just now, or not yet) keep their masks
        was_warming_up = {name for name, layer in self.layers if layer.warming_up}
        update = self._update_due(self.step_count + 1)
        drop_counts = self._drop_counts(self.step_count + 1, was_warming_up) if update else {}
        self._check_update_inputs(drop_counts)
        if self.step_count + 1 >= self.harden_step:  # every soft layer hardens now: refuse before any does
            for layer in self._soft_layers():
                layer.check_hardenable()
        self.step_count += 1
        self._keep_soft_permutations_feasible()
        self._warmup_step()
        self._harden_due()
        if update:
            self._update_masks(drop_counts)
        self._arm_gradient_capture()

    def stats(self) -> dict[str, float]:
        """Where training stands: kept fraction of the PA-DST weights, layers still in their
        dense warm-up, soft (Birkhoff) layers left and their mean penalty (0 without any)."""
        kept = sum(layer.structure.kept_count(layer.values, layer.index) for _, layer in self.layers)
        total = sum(layer.in_features * layer.out_features for _, layer in self.layers)
        with torch.no_grad():
            soft = [float(layer.penalty()) for _, layer in self.layers if layer.soft and layer.soft_perm is not None]
        return {"density": kept / total, "warm_up_layers": sum(layer.warming_up for _, layer in self.layers),
                "soft_layers": len(soft), "penalty": sum(soft) / len(soft) if soft else 0.0}

    def progress_postfix(self) -> dict[str, str]:
        """``stats`` for a progress bar (counts shown only while non-zero)."""
        stats = self.stats()
        postfix = {"density": f"{stats['density']:.3f}"}
        if stats["warm_up_layers"]:
            postfix["warm-up"] = str(stats["warm_up_layers"])
        if stats["soft_layers"]:
            postfix.update(soft=str(stats["soft_layers"]), penalty=f"{stats['penalty']:.3f}")
        return postfix

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"step": self.step_count, "options": dict(self.options)}

    def check_state_dict(self, state: dict) -> None:
        """Refuse a scheduler checkpoint saved with other options (ValueError naming one)."""
        for option, value in state["options"].items():
            if isinstance(value, list):  # a tuple option after a trip through JSON
                value = tuple(value)
            if self.options.get(option) != value:
                raise ValueError(f"scheduler checkpoint was saved with {option}={value!r}, this scheduler has "
                                 f"{self.options.get(option)!r}; nothing was loaded")

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.step_count = int(state["step"])
        self._arm_gradient_capture()
