"""PA-DST inside a Hugging Face ``Trainer``: ``Trainer(..., callbacks=[PADSTCallback(Block(8, 8), 0.9)])``.

The callback sparsifies the model when the ``Trainer`` is built (before it creates the
optimizer, so the optimizer holds the new layers), runs the ``DSTScheduler`` after every
optimizer step, adds ``padst/density``, ``padst/warm_up_layers``, ``padst/soft_layers`` and
``padst/penalty`` to every log (``log_history``, the console; reporting integrations such
as TensorBoard run before user callbacks and miss them), and keeps the scheduler's state in the ``Trainer``'s
checkpoints (``trainer_state.json``, as an ``ExportableState`` callback) so that
``trainer.train(resume_from_checkpoint=...)`` continues the same schedule. The permutation
penalty needs no change to the loss: the scheduler applies its gradient itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from padst_compiler.kernels.structures import Structure, structure_from_record, structure_record
from padst_compiler.training import DSTScheduler, padst_layers, sparsify


class PADSTCallback(TrainerCallback, ExportableState):
    """Sparsify at ``Trainer`` construction, step the PA-DST schedule, log it, checkpoint it.

    ``structure`` / ``sparsity``: what ``sparsify`` applies (both None: the model given to the
    ``Trainer`` is sparsified already). ``sparsify_options`` and ``scheduler_options`` go to
    ``sparsify`` and ``DSTScheduler`` (``total_steps`` is the ``Trainer``'s ``max_steps``).
    Everything here must be JSON-able (structures may be given as objects), since the
    ``Trainer`` stores it in its checkpoints.
    """

    def __init__(self, structure: Structure | dict | None = None, sparsity: float | None = None, *,
                 sparsify_options: dict | None = None, scheduler_options: dict | None = None):
        if (structure is None) != (sparsity is None):
            raise ValueError("PADSTCallback: give structure and sparsity together (or neither, for a model "
                             "sparsified already)")
        if isinstance(structure, dict):
            structure = structure_from_record(structure)
        if structure is not None and not isinstance(structure, Structure):
            raise TypeError(f"PADSTCallback: structure must be a Structure such as Block(8, 8), got {structure!r}")
        if "total_steps" in (scheduler_options or {}):
            raise ValueError("PADSTCallback: total_steps comes from the Trainer (max_steps); leave it out of "
                             "scheduler_options")
        self.structure, self.sparsity = structure, sparsity
        self.sparsify_options = dict(sparsify_options or {})
        self.scheduler_options = dict(scheduler_options or {})
        self.scheduler: DSTScheduler | None = None

    def state(self) -> dict:
        return {"args": {"structure": None if self.structure is None else structure_record(self.structure),
                         "sparsity": self.sparsity, "sparsify_options": self.sparsify_options,
                         "scheduler_options": self.scheduler_options},
                "attributes": {}, "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.structure is not None and not padst_layers(model):
            sparsify(model, self.structure, self.sparsity, **self.sparsify_options)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not padst_layers(model):
            raise ValueError("PADSTCallback: the model has no PA-DST layer. Pass PADSTCallback(structure, "
                             "sparsity) in Trainer(callbacks=[...]) so it sparsifies before the optimizer is "
                             "built (trainer.add_callback comes too late), or sparsify the model first")
        self.scheduler = DSTScheduler(model, optimizer, total_steps=state.max_steps, **self.scheduler_options)
        if state.global_step:
            self.scheduler.load_state_dict(self._saved_scheduler_state(state))

    def _saved_scheduler_state(self, state) -> dict:
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) and saved else saved
        scheduler = saved.get("scheduler") if isinstance(saved, dict) else None
        if scheduler is None or scheduler.get("step") != state.global_step:
            raise ValueError(f"PADSTCallback: resuming at step {state.global_step}, but the checkpoint holds no "
                             "PA-DST scheduler state for that step (was it saved without PADSTCallback?)")
        return scheduler

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.scheduler is None or logs is None:
            return
        stats = {f"padst/{key}": value for key, value in self.scheduler.stats().items()}
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


class CausalLMLogits(torch.nn.Module):
    """A causal LM reduced to ``ids -> logits`` (no cache): the function a deployment exports."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def model_from_checkpoint(directory: str | Path) -> torch.nn.Module:
    """The Hugging Face model a ``padst_compiler.save`` folder holds, built from its
    ``config.json`` (the class its ``architectures`` names) and loaded."""
    from padst_compiler.checkpoint import HF_CONFIG, load

    directory = Path(directory)
    if not (directory / HF_CONFIG).is_file():
        raise ValueError(f"{directory} has no {HF_CONFIG}: it was not saved from a Hugging Face model")
    config = transformers.AutoConfig.from_pretrained(directory)
    names = config.architectures or []
    if len(names) != 1 or not hasattr(transformers, names[0]):
        raise ValueError(f"{directory / HF_CONFIG} names the architectures {names!r}, not one transformers class")
    return load(lambda: getattr(transformers, names[0])(config), directory)


def export_causal_lm(directory: str | Path, path: str | Path) -> Path:
    """``padst export``: the causal LM saved in ``directory`` as a package mapping token ids
    ``[batch, sequence]`` to logits, for batches of 1 to 4096 and sequences of 2 up to the
    model's maximum length."""
    from padst_compiler.deploy import export

    model = CausalLMLogits(model_from_checkpoint(directory))
    longest = getattr(model.model.config, "max_position_embeddings", None) or 1024
    example = torch.zeros(2, min(16, longest), dtype=torch.long)  # sizes above 1: export keeps them dynamic
    batch, sequence = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=longest)
    return export(model, (example,), path, dynamic_shapes=({0: batch, 1: sequence},))


__all__ = ["PADSTCallback", "CausalLMLogits", "model_from_checkpoint", "export_causal_lm"]
