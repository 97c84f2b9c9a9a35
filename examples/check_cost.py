"""What the always-on index range checks cost: the time of one memoized check per call, and
what a call through the dispatcher (forward, input and value gradients: each checks the
structure's index and the fused ``in_index``) pays for them against its own time.

    python examples/check_cost.py
"""

import time

import torch

from padst_compiler.kernels import Block, set_checks
from padst_compiler.kernels.ops import checks
from padst_compiler.timing import interleaved_medians


def per_call_us(fn, calls: int = 100_000) -> float:
    fn()  # the first call checks the values; later ones find the result filed under the tensor
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


if __name__ == "__main__":
    structure = Block(32, 32)
    gen = torch.Generator().manual_seed(0)
    weight = structure.project(torch.randn(3072, 768, generator=gen), 0.9)
    in_index = torch.randperm(768, generator=gen)
    with set_checks(False):  # what stays on: the range checks
        index_us = per_call_us(lambda: checks.check_in_range("op", "index", weight.index, 768 // 32))
        in_index_us = per_call_us(lambda: checks.check_permutation("op", "in_index", in_index, 768))
        per_step_us = 3 * (index_us + in_index_us)  # forward, grad_input, grad_values
        print(f"range check of a checked index: {index_us:.1f} us; of in_index: {in_index_us:.1f} us; "
              f"a forward+backward makes 3 of each: {per_step_us:.0f} us")
        for tokens in (16, 4096):
            x = torch.randn(tokens, 768, generator=gen, requires_grad=True)
            values = weight.values.clone().requires_grad_()
            grad = torch.randn(tokens, 3072, generator=gen)
            step_ms = interleaved_medians({"step": lambda: structure.linear(
                x, values, weight.index, 3072, None, in_index).backward(grad)}, repeats=15)["step"] * 1e3
            print(f"{structure} 768->3072 at 0.9, {tokens} tokens: forward+backward {step_ms:.2f} ms, range checks "
                  f"{per_step_us / 1e3 / step_ms * 100:.2f} % of it")
