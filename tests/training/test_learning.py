"""Evidence that PA-DST learns: a hidden permutation no unpermuted structure can represent."""

import torch
from torch import nn

from padst_compiler.kernels import set_checks
from padst_compiler.training import Block, DSTScheduler, sparsify

D, STRUCTURE, SPARSITY, STEPS = 32, Block(4, 4), 0.75, 2000


def teacher():
    """y = S* x[..., p*] with S* block-sparse: no block-sparse matrix fits it unpermuted."""
    gen = torch.Generator().manual_seed(123)
    weight = STRUCTURE.project(torch.randn(D, D, generator=gen), SPARSITY).to_dense()
    hidden = torch.randperm(D, generator=gen)
    return lambda x: x[..., hidden] @ weight.t()


def train_student(permutation):
    torch.manual_seed(0)
    target = teacher()
    model = sparsify(nn.Sequential(nn.Linear(D, D, bias=False)), STRUCTURE, SPARSITY, permutation=permutation)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=STEPS)  # the default settings
    gen = torch.Generator().manual_seed(99)
    around_hardening = None
    for _ in range(STEPS):
        x = torch.randn(256, D, generator=gen)
        loss = (model(x) - target(x)).square().mean()
        optimizer.zero_grad()
        (loss + sched.permutation_penalty()).backward()
        optimizer.step()
        was_soft = model[0].soft
        sched.step()
        if was_soft and not model[0].soft:
            with torch.no_grad():
                around_hardening = (loss.item(), (model(x) - target(x)).square().mean().item())
    x = torch.randn(4096, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return (model(x) - target(x)).square().mean().item(), around_hardening


def test_learned_permutation_beats_no_permutation_and_hardening_keeps_the_loss():
    with set_checks(False):
        unpermuted, _ = train_student("none")
        learned, (before, after) = train_student("learned")
    assert learned * 2 <= unpermuted, (learned, unpermuted)
    assert after <= 1.5 * before + 1e-6, (before, after)
