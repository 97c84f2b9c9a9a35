"""The ops under torch.compile with the default Inductor backend (one compile: they are slow here)."""

import pytest
import torch

from padst_compiler.kernels import NM, Block, Diagonal

pytestmark = pytest.mark.slow


def test_inductor_compiles_every_op_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    layers = []
    for structure in (Block(4, 8), NM(4), Diagonal()):
        weight = structure.project(torch.randn(32, 32, generator=gen), 0.5)
        layers.append((structure, weight.index, weight.values.clone().requires_grad_(),
                       torch.randn(32, generator=gen).requires_grad_()))
    in_index, out_index = torch.randperm(32, generator=gen), torch.randperm(32, generator=gen)

    def model(x):
        h = torch.ops.padst.permute(x, in_index)
        for structure, index, values, bias in layers:
            h = torch.relu(structure.op(h, values, index, 32, bias, in_index, out_index))
        return h.sum(-1)

    x = torch.randn(4, 6, 32, generator=gen, requires_grad=True)
    params = [x] + [t for layer in layers for t in layer[2:]]
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), params)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), params)
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
