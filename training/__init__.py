"""PA-DST training: structured sparse layers with learned permutations (design section 2).

    model = sparsify(model, Block(32, 32), sparsity=0.9, permutation="learned")
    sched = DSTScheduler(model, optimizer, total_steps=T)
    loss.backward(); optimizer.step(); sched.step()   # no penalty term in the loss
"""

if __name__ != "padst_compiler.training":  # pragma: no cover - exercised in a subprocess test
    from padst_compiler.misplaced import stand_in

    stand_in(__name__, "padst_compiler.training")

from padst_compiler.kernels.structures import NM, Block, Diagonal, Structure, Unstructured
from padst_compiler.training.layer import PADSTLinear
from padst_compiler.training.densify import densify
from padst_compiler.training.scheduler import DSTScheduler
from padst_compiler.training.sparsify import guard_checkpoints, padst_layers, sparsify, sparsity_summary


def harden_permutations(model) -> int:
    """Harden every still-soft permutation of ``model`` now; returns how many were hardened.
    Every layer is checked first: a refusal hardens none."""
    soft = [layer for _, layer in padst_layers(model) if layer.soft]
    for layer in soft:
        layer.check_hardenable()
    for layer in soft:
        layer.harden()
    return len(soft)


__all__ = ["Block", "NM", "Diagonal", "Unstructured", "Structure", "PADSTLinear", "DSTScheduler",
           "sparsify", "sparsity_summary", "harden_permutations", "padst_layers", "densify",
           "guard_checkpoints"]
