"""Compiling Triton kernels for NVIDIA GPUs on a machine without one, through Triton's NVIDIA
backend and the ptxas it bundles: the kernels of ``triton_kernels`` (test_triton_codegen.py)
and the templates Inductor generates from ``inductor_lowering`` (test_triton.py)."""

import importlib.util
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from padst_compiler.kernels.inductor import lowering as inductor_lowering

# Target -> the most shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# the limit Triton checks before it launches: 227 KiB on H100 (sm_90), 163 KiB on A100 (sm_80).
TARGETS = {GPUTarget("cuda", 90, 32): 227 * 1024, GPUTarget("cuda", 80, 32): 163 * 1024}
SM90 = GPUTarget("cuda", 90, 32)


def ptxas_problem() -> str | None:
    """Why no cubin can be built here, or None."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        for gpu in TARGETS:
            nvidia.get_ptxas(gpu.arch)  # bundled, or named by TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH
    except RuntimeError as error:
        return f"no usable ptxas: {error}"
    return None


def compile_to_cubin(source: ASTSource, options: dict, target: GPUTarget) -> None:
    """Compile; fail on an empty cubin or more shared memory than the target allows a block."""
    compiled = triton.compile(source, target=target, options=options)
    assert compiled.asm["cubin"], "ptxas produced an empty cubin"
    assert compiled.metadata.shared <= TARGETS[target], \
        f"needs {compiled.metadata.shared} bytes of shared memory, sm_{target.arch} allows {TARGETS[target]}"


# ------------------------------------------------------- Inductor's template kernels

_CONSTEXPR = "{} : tl.constexpr = {}"


def _template_kernel(path: Path):
    """The CachingAutotuner Inductor's code defines in a saved template kernel source."""
    spec = importlib.util.spec_from_file_location(f"padst_template_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, path.name.split("-")[0])


def _with_config(source: str, config: dict) -> str:
    """The template source with another tile configuration: Inductor writes each meta
    parameter as a constexpr line at the top of the kernel."""
    for name, value in config.items():
        if name != "num_warps":
            source, count = re.subn(_CONSTEXPR.format(name, r"\d+"), _CONSTEXPR.format(name, value), source)
            assert count == 1, f"{name} is not a constexpr line of the template"
    return source


def template_jobs(directory: Path):
    """(name, ASTSource, options, target) for every saved template kernel: each tile
    configuration the lowering offers on sm_90, the generated one on sm_80."""
    jobs = []
    tiles = directory / "tiles"
    tiles.mkdir(exist_ok=True)
    for path in sorted(directory.glob("triton_tem_*.py")):
        structure = next(name for name in inductor_lowering._TEMPLATES if name in path.name.split("-")[0])
        generated = _template_kernel(path)
        stages = generated.configs[0].num_stages
        configs = [(config, SM90) for config in inductor_lowering._TEMPLATES[structure].configs()]
        configs.append((dict(num_warps=generated.configs[0].num_warps), GPUTarget("cuda", 80, 32)))
        for config, target in configs:
            variant = tiles / f"{path.stem}-{'-'.join(f'{k}{v}' for k, v in config.items())}.py"
            variant.write_text(_with_config(path.read_text(), config))
            kernel = _template_kernel(variant)
            meta = kernel.triton_meta
            source = ASTSource(kernel.fn, meta["signature"], meta["constants"], meta["configs"][0])
            jobs.append((f"{variant.stem} sm_{target.arch}", source,
                         dict(num_warps=config["num_warps"], num_stages=stages), target))
    return jobs
