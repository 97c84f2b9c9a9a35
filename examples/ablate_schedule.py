"""Ablate one scheduler option of the learned-permutation recipe over the digits part of the
gap map: every cell where ``learned`` is trained, the same seeds and settings, one extra row.

    python examples/ablate_schedule.py "learned-once={'reselect_at': ()}" results/ablations/learned-once
    python examples/ablate_schedule.py "learned-h20={'harden_at': 0.2}" results/ablations/learned-h20

The first argument names the row and gives its ``DSTScheduler`` options (a Python dict
literal); the second is the output folder (``runs.jsonl``, resumable). Compare with the
``learned`` rows of ``padst bench accuracy --tasks digits``.
"""

import ast
import sys
from pathlib import Path

from padst_compiler import gapmap

NAME, OPTIONS = sys.argv[1].split("=", 1)
# registered at import time: the training workers import this file again and need the row too
gapmap.METHODS[NAME] = gapmap.Method(f"learned permutation with {OPTIONS}", permutation="learned",
                                     schedule=tuple(ast.literal_eval(OPTIONS).items()))

if __name__ == "__main__":
    learned = [cell for cell in gapmap.grid(tasks=("digits",)) if cell.method == "learned"]
    gapmap.run([gapmap.Cell(c.task, c.depth, NAME, c.structure, c.sparsity) for c in learned], Path(sys.argv[2]),
               workers=1)
