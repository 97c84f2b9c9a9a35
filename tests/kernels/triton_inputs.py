"""Inputs for the Triton launchers and one call of all three of a structure, shared by the
interpreted cases (which check the results) and the code-generation test (which intercepts
the launches and compiles what they would run)."""

import torch

from padst_compiler.kernels.triton import kernels as triton_kernels

BIAS, IN, OUT = "bias", "in", "out"


def case_id(case):
    structure, _, (out_features, in_features), tokens, extras = case
    return f"{structure}-{out_features}x{in_features}-t{tokens}-" + ("+".join(sorted(extras)) or "plain")


def make_inputs(structure, out_features, in_features, tokens, extras, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = structure.project(torch.randn(out_features, in_features, generator=gen), 0.5)
    x = torch.randn(tokens, in_features, generator=gen)
    grad = torch.randn(tokens, out_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if BIAS in extras else None
    in_index = torch.randperm(in_features, generator=gen) if IN in extras else None
    out_index = torch.randperm(out_features, generator=gen) if OUT in extras else None
    return weight, x, grad, bias, in_index, out_index


def kernel_results(prefix, weight, x, grad, bias, in_index, out_index, dtype):
    forward, grad_input, grad_values = (getattr(triton_kernels, f"{prefix}_{part}")
                                        for part in ("forward", "grad_input", "grad_values"))
    x, grad, values = x.to(dtype), grad.to(dtype), weight.values.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    out_features, in_features = grad.shape[1], x.shape[1]
    return (forward(x, values, weight.index, out_features, bias, in_index, out_index),
            grad_input(grad, values, weight.index, in_features, in_index, out_index),
            grad_values(grad, x, values, weight.index, in_index, out_index))
