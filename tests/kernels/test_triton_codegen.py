"""Every Triton kernel compiles for NVIDIA GPUs (sm_90 and sm_80), on a machine without one.

The interpreter cases check what the kernels compute, but the interpreter accepts code that
GPU code generation rejects (tl.dot shapes and dtypes, constexpr misuse, types that change
across loop iterations, too much shared memory). Here the launchers run on CPU tensors, which
is enough as they only prepare indices with torch before launching; each launch is intercepted,
specialised by Triton's own argument binder exactly as its runtime would on a GPU, and compiled
for every autotune config through the NVIDIA backend to a cubin, with the ptxas Triton bundles.
"""

import itertools
from unittest import mock

import pytest
import torch

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's NVIDIA backend")

from triton.compiler import ASTSource, make_backend  # noqa: E402  (after the backend check)
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from padst_compiler.kernels import NM, Block, Diagonal  # noqa: E402
from padst_compiler.kernels.triton import kernels as triton_kernels  # noqa: E402

from . import gpu_compile  # noqa: E402
from .triton_inputs import BIAS, IN, OUT, case_id, kernel_results, make_inputs  # noqa: E402

if triton_kernels.INTERPRETED:
    pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted, not compiled", allow_module_level=True)
if gpu_compile.ptxas_problem():
    pytest.skip(gpu_compile.ptxas_problem(), allow_module_level=True)

ALL = {BIAS, IN, OUT}
# ((structure, launcher prefix, (out, in), tokens, fused extras), dtype): the case format of
# interpreted_triton_cases.py, with a dtype. Every autotune config of the kernels a case launches,
# with every flag on (the most code), once per kind of product: tl.dot in fp32 (ieee precision,
# so FMA, not tensor cores; at the smallest dot block, as ptxas needs ~40 s here for all configs
# of a 64x64 one), tl.dot on tensor cores at the largest block, the broadcast product of blocks
# smaller than 16, and the row-sparse kernels.
EVERY_CONFIG = [
    ((Block(16, 16), "block", (128, 256), 64, ALL), torch.float32),
    ((Block(64, 64), "block", (128, 256), 64, ALL), torch.bfloat16),
    ((Block(8, 8), "block", (64, 128), 33, ALL), torch.float16),
    ((NM(4), "nm", (64, 128), 33, ALL), torch.bfloat16),
]
# The first config only (what configs change is covered above): every other flag combination of
# each kernel, each dtype on both block paths and the row-sparse kernels, and the integer
# specialisations the runtime makes (an int equal to 1 becomes a constant: one token, one kept
# block per block-row; a multiple of 16 gets a divisibility hint: 64 tokens but not 33, most
# feature counts but not 36, 40 or 120).
FIRST_CONFIG = [
    ((Block(32, 32), "block", (64, 128), 64, set()), torch.float32),
    ((Block(32, 16), "block", (64, 128), 33, {BIAS}), torch.float16),
    ((Block(16, 16), "block", (64, 128), 33, {IN}), torch.bfloat16),
    ((Block(8, 8), "block", (64, 128), 1, {OUT}), torch.float32),
    ((Block(8, 8), "block", (64, 128), 33, {BIAS, IN}), torch.bfloat16),
    ((Block(64, 64), "block", (128, 128), 1, {BIAS, OUT}), torch.float32),  # kept = 1
    ((Block(4, 8), "block", (36, 120), 64, {IN, OUT}), torch.float16),
    ((NM(32), "nm", (64, 128), 64, set()), torch.float32),
    ((NM(4), "nm", (64, 128), 1, {BIAS}), torch.float16),
    ((Diagonal(), "diag", (64, 128), 33, {IN}), torch.float32),
    ((Diagonal(), "diag", (120, 40), 33, {OUT}), torch.bfloat16),
    ((NM(4), "nm", (128, 64), 64, {BIAS, IN}), torch.float32),
    ((Diagonal(), "diag", (64, 128), 1, {BIAS, OUT}), torch.float16),
    ((NM(32), "nm", (64, 128), 33, {IN, OUT}), torch.bfloat16),
]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def captured_launches(case, dtype):
    """(autotuned kernel, arguments, constexprs) of the three launches of one case, not run."""
    structure, prefix, (out_features, in_features), tokens, extras = case
    launches = []

    def record(kernel, grid):
        return lambda *args, **constexprs: launches.append((kernel, args, constexprs))

    with mock.patch.object(triton_kernels, "_launch", record):
        kernel_results(prefix, *make_inputs(structure, out_features, in_features, tokens, extras), dtype)
    return launches


def specialise(kernel, args, constexprs, config, target):
    """What ``JITFunction.run`` would compile for this launch on ``target``: its own binder and
    argument packing (a private method, so the signature, constants and divisibility hints are
    the runtime's rather than a copy of its rules), given the target's backend instead of the
    current device's."""
    backend = make_backend(target)
    fn, kwargs = kernel.fn, {**constexprs, **config.all_kwargs()}
    bound, specialisation, options = create_function_from_signature(fn.signature, fn.params, backend)(
        *args, **kwargs)
    options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound, specialisation, options)
    return ASTSource(fn, signature, constants, attrs), options


def config_id(config):
    return ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",w{config.num_warps}s{config.num_stages}"


def compile_jobs():
    """One job per distinct (specialised kernel, options, target), named after the first case
    that needs it: cases can launch identical specialisations (the gradient kernels ignore the bias)."""
    cases = [(case, dtype, None) for case, dtype in EVERY_CONFIG] + [(case, dtype, 1) for case, dtype in FIRST_CONFIG]
    jobs = {}
    for case, dtype, n_configs in cases:
        for kernel, args, constexprs in captured_launches(case, dtype):
            for config, target in itertools.product(kernel.configs[:n_configs], gpu_compile.TARGETS):
                source, options = specialise(kernel, args, constexprs, config, target)
                name = "-".join((source.name.strip("_").removesuffix("_kernel"), case_id(case), DTYPE_NAMES[dtype],
                                 config_id(config), f"sm{target.arch}"))
                jobs.setdefault((source.hash(), options, target), pytest.param(source, options, target, id=name))
    return list(jobs.values())


@pytest.mark.parametrize("source,options,target", compile_jobs())
def test_kernel_compiles_to_a_cubin(source, options, target):
    gpu_compile.compile_to_cubin(source, options.__dict__, target)
