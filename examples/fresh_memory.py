"""What fresh memory costs a compiled CPU training step, with and without
``padst_compiler.keep_freed_memory()``: milliseconds, system time and page faults per step
of a GPT stack (4096 tokens as 8 x 512), dense (Inductor) and PA-DST (padst, Block 32x32 at
0.9). Each case runs in a process of its own, since keeping freed memory is process-wide.

    python examples/fresh_memory.py [LAYERS]        (default 12, GPT-2 small; about 6 min)
"""

import resource
import statistics
import subprocess
import sys
import time

STEPS = 3


def one_case(layers: int, model_kind: str, keep: bool) -> None:
    import torch

    import padst_compiler
    from padst_compiler.models import GPT, GPTConfig
    from padst_compiler.training import Block, sparsify

    if keep and not padst_compiler.keep_freed_memory():
        sys.exit("keep_freed_memory() needs glibc")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, n_layer=layers, n_head=12, d_model=768))
    if model_kind == "PA-DST":
        sparsify(model, Block(32, 32), 0.9, permutation="random", strict=True)
    compiled = torch.compile(model, backend="padst" if model_kind == "PA-DST" else "inductor")
    idx = torch.randint(0, 256, (8, 512), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        compiled(idx).float().mean().backward()

    for _ in range(2):  # compile, then one step that allocates what later ones may reuse
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{model_kind}\t{'kept' if keep else 'default'}\t{statistics.median(seconds) * 1e3:.0f}\t"
          f"{(after.ru_stime - before.ru_stime) / STEPS * 1e3:.0f}\t{(after.ru_minflt - before.ru_minflt) // STEPS}")


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    print(f"GPT {layers} layers, d 768, 4096 tokens: one training step (median of {STEPS})")
    print("model\tfreed memory\tstep ms\tsystem ms\tpage faults")
    for keep in (False, True):
        for model_kind in ("dense", "PA-DST"):
            subprocess.run([sys.executable, __file__, "--case", str(layers), model_kind, str(int(keep))], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--case"]:
        one_case(int(sys.argv[2]), sys.argv[3], bool(int(sys.argv[4])))
    else:
        main()
