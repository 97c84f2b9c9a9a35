import pytest
import torch

from padst_compiler.memory import tensor_peak_bytes

MIB = 2 ** 20


def test_the_peak_counts_what_is_held_at_the_worst_moment_not_what_was_allocated_in_total():
    kept_before = torch.ones(MIB)  # alive before the call: not counted

    def call():
        first = torch.empty(MIB, dtype=torch.uint8)
        second = torch.empty(3 * MIB, dtype=torch.uint8)
        del first, second  # 4 MiB held here
        return torch.empty(2 * MIB, dtype=torch.uint8)  # 2 MiB, then 6 MiB allocated in all

    assert tensor_peak_bytes(call) == 4 * MIB
    assert kept_before.sum() == MIB


def test_the_peak_of_a_backward_counts_its_gradients():
    x = torch.randn(512, 512, requires_grad=True)
    peak = tensor_peak_bytes(lambda: (x @ x).sum().backward())
    assert peak >= x.nbytes  # x.grad at least, and the product's buffers on the way
    assert peak < 8 * x.nbytes


def test_an_unknown_device_is_named():
    with pytest.raises(ValueError, match="'tpu'"):
        tensor_peak_bytes(lambda: None, device="tpu")
