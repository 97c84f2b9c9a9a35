import platform
import subprocess
import sys

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


_REALLOCATE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from padst_compiler.allocator import keep_freed_memory
    assert keep_freed_memory()
for _ in range(6):  # once settled, a round takes what the one before freed, if that was kept
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(64 * 2 ** 20 // 4) for _ in range(4)]  # 4 x 64 MiB, each above the mmap threshold
    del held
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_kept_freed_memory_is_reused_without_a_page_fault_where_it_used_to_be_mapped_afresh():
    def faults(mode):
        result = subprocess.run([sys.executable, "-c", _REALLOCATE, mode], capture_output=True, text=True, check=True)
        return int(result.stdout)

    pages = 256 * 2 ** 20 // 4096
    assert faults("default") > pages // 2  # each 64 MiB tensor faulted in afresh (4 KiB pages)
    assert faults("keep") < pages // 20


def test_keeping_freed_memory_changes_nothing_where_the_c_library_is_not_glibc(monkeypatch):
    from padst_compiler import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *args: pytest.fail("the C library was touched"))
    assert allocator.keep_freed_memory() is False
