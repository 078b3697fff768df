"""Byte corpora for nano_egg: a 1-D uint8 array with a 0 byte before every document.

The default corpus is built on the spot from the Python source files of the running
interpreter's standard library (present on every machine, no download). ``--data PATH`` loads a
``.npy`` file in the same format, such as the MiniPile sample shipped in ``data/`` (the file the
original torcheggroll example validated on; origin and terms in ``data/README.md``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np


def stdlib_corpus(max_bytes: int = 4_000_000) -> np.ndarray:
    """The top-level ``*.py`` files of the standard library, sorted by name, one document each.

    Stops once ``max_bytes`` bytes are collected. Bytes that are 0 inside a file are dropped so
    that 0 only marks document starts.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources found under {root}; pass --data PATH instead")
    parts: list[np.ndarray] = []
    total = 0
    for f in files:
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        raw = raw[raw != 0]
        parts.append(np.concatenate([np.zeros(1, dtype=np.uint8), raw]))
        total += raw.size + 1
        if total >= max_bytes:
            break
    return np.concatenate(parts)


def load_corpus(path: str | None) -> np.ndarray:
    """``path`` (a ``.npy`` of uint8 bytes) or, when None, the standard-library corpus."""
    if path is None:
        return stdlib_corpus()
    data = np.load(path)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(
            f"Invalid data file: {path} (expected a 1-D uint8 array, got {data.dtype} {data.shape})"
        )
    return data


def split_documents(
    data: np.ndarray, max_docs: int = 0, valid_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``max_docs`` documents (0: all) and split them into train and validation.

    Documents start at each 0 byte. The last ``valid_fraction`` of the kept documents (at least
    one) is the validation split.

    Returns:
        ``(train, valid)`` 1-D uint8 arrays, each still with a 0 before every document.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"Invalid valid_fraction: {valid_fraction}")
    starts = np.flatnonzero(data == 0)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])  # text before the first marker is a document too
    if max_docs > 0:
        starts_end = np.append(starts, data.size)
        data = data[: starts_end[min(max_docs, starts.size)]]
        starts = starts[:max_docs]
    n_docs = starts.size
    if n_docs < 2:
        raise ValueError(f"Invalid data: need at least 2 documents to split, got {n_docs}")
    n_valid = max(1, round(n_docs * valid_fraction))
    cut = starts[n_docs - n_valid]
    return data[:cut], data[cut:]
