"""Dense reference for the structured ops: masked dense matmul with explicit permutations."""

import torch.nn.functional as F


def dense_reference(structure, x, values, index, out_features, bias=None, in_index=None, out_index=None):
    weight = structure.expand(values, index, out_features, x.shape[-1])
    if in_index is not None:
        x = x[..., in_index]
    y = F.linear(x, weight, bias)
    return y if out_index is None else y[..., out_index]
