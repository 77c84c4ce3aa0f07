"""Union-find over picture hashes: the loop behind `dedupe.duplicate_groups`, compiled with numba when present.

The Python function is the reference and the fallback; numba compiles the very same source.
"""

from __future__ import annotations

import numpy as np

__all__ = ["union", "union_python"]


def union_python(parent: np.ndarray, product_row: np.ndarray, keys: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Join each picture's product (`product_row[i]`) to the first product seen with its hash (`keys[i]`).

    `parent` starts as arange(products) and `first` as -1 per distinct hash; a set's root is always its smallest
    row, and the returned `parent` maps every row straight to its root.
    """
    for i in range(len(keys)):
        a, b = first[keys[i]], product_row[i]
        if a < 0:
            first[keys[i]] = b
            continue
        while parent[a] != a:  # find, halving the path on the way
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b
    for row in range(len(parent)):  # parents point to smaller rows, so one forward pass flattens every chain
        parent[row] = parent[parent[row]]
    return parent


try:
    import numba

    union = numba.njit(cache=True, nogil=True)(union_python)
except ImportError:  # pragma: no cover - numba is a dependency; the loop stays correct without it
    union = union_python
