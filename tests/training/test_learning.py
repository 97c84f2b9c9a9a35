"""Evidence that PA-DST learns: a hidden permutation no unpermuted structure can represent.

The teacher is ``y = S* x[..., p*]`` with ``S*`` structured and its weights drawn like
``nn.Linear``'s, times 0.01, 1 or 100: the default recipe must find ``p*`` whatever the
scale of the weights and of the loss, on a finite training set and on fresh samples, for
every structure, with the scheduler's default settings and one optimizer set-up for all.
"""

import math

import pytest
import torch
from torch import nn

from padst_compiler.kernels import set_checks
from padst_compiler.training import NM, Block, DSTScheduler, Diagonal, sparsify

D, SPARSITY, STEPS, BATCH, TRAINING_SET = 32, 0.75, 1000, 256, 4096


def teacher(structure, scale):
    gen = torch.Generator().manual_seed(123)
    bound = 1 / math.sqrt(D)  # nn.Linear's initialisation
    weight = structure.project(torch.empty(D, D).uniform_(-bound, bound, generator=gen) * scale, SPARSITY).to_dense()
    hidden = torch.randperm(D, generator=gen)
    return lambda x: x[..., hidden] @ weight.t()


def train_student(structure, permutation, scale, finite):
    """Relative test error ``|student(x) - teacher(x)|^2 / |teacher(x)|^2`` on fresh samples, and
    the training loss just before and just after hardening."""
    torch.manual_seed(0)
    target = teacher(structure, scale)
    model = sparsify(nn.Sequential(nn.Linear(D, D, bias=False)), structure, SPARSITY, permutation=permutation)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    sched = DSTScheduler(model, optimizer, total_steps=STEPS)  # the default settings
    gen = torch.Generator().manual_seed(99)
    data = torch.randn(TRAINING_SET, D, generator=gen)
    around_hardening = None
    for _ in range(STEPS):
        x = data[torch.randint(TRAINING_SET, (BATCH,), generator=gen)] if finite else torch.randn(BATCH, D, generator=gen)
        loss = (model(x) - target(x)).square().mean()
        optimizer.zero_grad()
        (loss + sched.permutation_penalty()).backward()
        optimizer.step()
        was_soft = model[0].soft
        sched.step()
        decay.step()
        if was_soft and not model[0].soft:
            with torch.no_grad():
                around_hardening = (loss.item(), (model(x) - target(x)).square().mean().item())
    x = torch.randn(4096, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return (model(x) - target(x)).square().mean().item() / target(x).square().mean().item(), around_hardening


@pytest.mark.parametrize("finite", [True, False], ids=["4096-samples", "fresh-samples"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("structure", [Block(4, 4), NM(4), Diagonal()], ids=str)
def test_learned_permutation_beats_no_permutation_at_every_scale(structure, scale, finite):
    with set_checks(False):
        unpermuted, _ = train_student(structure, "none", scale, finite)
        learned, (before, after) = train_student(structure, "learned", scale, finite)
    print(f"{structure} scale {scale} {'4096 samples' if finite else 'fresh samples'}: relative error none "
          f"{unpermuted:.2e}, learned {learned:.2e} ({unpermuted / learned:.3g}x lower); loss at hardening "
          f"{before:.3g} -> {after:.3g}")  # the README's figures: pytest tests/training/test_learning.py -s
    assert learned * 5 <= unpermuted, (learned, unpermuted)
    assert after <= 1.5 * before + 1e-6 * scale ** 2, (before, after)  # hardening keeps what the warm-up learned
