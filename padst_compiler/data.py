"""The embedded default corpus: the Python standard library's own source, byte level.

Every machine with Python has it, nobody has to download it, and it is real text with
long-range structure (indentation, names, docstrings).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_corpus(max_bytes: int = 2_000_000) -> bytes:
    """Up to ``max_bytes`` of ``.py`` files from the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size == 0:
        raise FileNotFoundError(f"no Python source found under {root}")
    return b"".join(chunks)[:max_bytes]


class ByteCorpus:
    """Train / validation split of a byte string and random fixed-length batches."""

    def __init__(self, data: bytes, validation_fraction: float = 0.1):
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(len(tokens) * (1 - validation_fraction))
        self.train, self.validation = tokens[:split], tokens[split:]

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        """Inputs and next-byte targets, ``[batch, block]`` each."""
        data = self.train if split == "train" else self.validation
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s: s + block_size + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]
