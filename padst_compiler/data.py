"""The embedded default data, present on every machine, nothing to download.

- The Python standard library's own source, byte level: real text with long-range
  structure (indentation, names, docstrings).
- scikit-learn's bundled 8x8 digits (1797 images): a classification task whose input
  layout (pixels in raster order) is fixed, so a sparse first layer cannot re-learn it.
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


class Digits:
    """scikit-learn's 8x8 digits as flat 64-pixel rows, standardised with the training split's
    statistics; a fixed split (20 % test) that does not depend on any run's seed."""

    def __init__(self, test_fraction: float = 0.2):
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        test = int(len(x) * test_fraction)
        self.test_x, self.test_y = x[order[:test]], y[order[:test]]
        self.train_x, self.train_y = x[order[test:]], y[order[test:]]
        mean, std = self.train_x.mean(0), self.train_x.std(0).clamp(min=1e-3)  # border pixels are always 0
        self.train_x, self.test_x = (self.train_x - mean) / std, (self.test_x - mean) / std

    def batch(self, batch_size: int, generator: torch.Generator):
        """A random training batch: inputs ``[batch, 64]`` and labels ``[batch]``."""
        rows = torch.randint(len(self.train_x), (batch_size,), generator=generator)
        return self.train_x[rows], self.train_y[rows]
