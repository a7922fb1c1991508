"""Input checking and normalisation shared by the estimators.

Everything the estimators accept is turned into one of two shapes here, so the
maths modules never see a list, a tensor or a NaN:

* a dense ``(P, N)`` float matrix (same number of samples for every prompt), or
* a list of 1-D float arrays (a ragged number of samples per prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

NanPolicy = Literal["raise", "omit"]


def _to_float_array(values: object, name: str) -> np.ndarray:
    """Convert array-likes (lists, numpy, CPU/CUDA tensors) to a float64 array."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch tensors, duck-typed
        values = values.detach().cpu().double().numpy()  # also bfloat16, which numpy lacks
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as err:  # e.g. inhomogeneous nested lists
        raise TypeError(f"{name} could not be converted to a numeric array: {err}") from err
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)):
        raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real-valued, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _all_finite(array: np.ndarray) -> bool:
    """Fast path: a finite sum means every value is finite (NaN and inf propagate);
    only an overflowing sum needs the element-wise check."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None)):
            return True
    return bool(np.isfinite(array).all())


def _is_ragged(values: object) -> bool:
    """A list/tuple of rows whose lengths differ (or that are themselves arrays)."""
    if isinstance(values, np.ndarray) or hasattr(values, "detach"):
        return False
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or not values:
        return False
    first = values[0]
    if not hasattr(first, "__len__") or isinstance(first, (str, bytes)):
        return False
    lengths = {len(row) for row in values}  # type: ignore[arg-type]
    return len(lengths) > 1


def _describe_bad(mask: np.ndarray, name: str, ragged_row: int | None = None) -> str:
    where = np.argwhere(mask)
    count = int(mask.sum())
    shown = ", ".join(
        str(tuple(int(i) for i in idx)) if ragged_row is None else str((ragged_row, int(idx[0]))) for idx in where[:5]
    )
    more = f" (first 5 of {count})" if count > 5 else ""
    return f"{name} has {count} non-finite value(s) (NaN or inf) at (prompt, sample) {shown}{more}"


def check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")


def paired_scores(
    proxy: object, score: object, *, nan_policy: NanPolicy = "raise", names=("proxy", "score")
) -> tuple[list[np.ndarray] | np.ndarray, list[np.ndarray] | np.ndarray, bool]:
    """Validate two paired score containers.

    Returns ``(proxy, score, one_prompt)``: either two ``(P, N)`` float arrays or two
    lists of 1-D arrays (ragged), and whether the input was a single 1-D prompt.
    With ``nan_policy="omit"`` non-finite pairs are dropped (which may make the result
    ragged); with ``"raise"`` they are a ``ValueError`` naming how many and where.
    """
    check_nan_policy(nan_policy)
    p_name, s_name = names
    if _is_ragged(proxy) or _is_ragged(score):
        return _paired_ragged(proxy, score, nan_policy, names)

    p = _to_float_array(proxy, p_name)
    s = _to_float_array(score, s_name)
    if p.shape != s.shape:
        raise ValueError(f"{p_name} and {s_name} must have the same shape, got {p.shape} and {s.shape}")
    if p.ndim not in (1, 2):
        raise ValueError(f"{p_name} must be 1-D (one prompt) or 2-D (prompts x samples), got shape {p.shape}")
    one_prompt = p.ndim == 1
    if one_prompt:
        p, s = p[None, :], s[None, :]
    if p.size == 0:
        raise ValueError(f"{p_name} and {s_name} are empty (shape {p.shape}): need at least one sample")

    if _all_finite(p) and _all_finite(s):
        return p, s, one_prompt
    bad = ~(np.isfinite(p) & np.isfinite(s))
    if bad.any():
        if nan_policy == "raise":
            which = p_name if (~np.isfinite(p)).any() else s_name
            mask = ~np.isfinite(p) if which == p_name else ~np.isfinite(s)
            raise ValueError(
                _describe_bad(mask, which) + "; clean them, or pass nan_policy='omit' to drop those samples"
            )
        rows_p = [row[keep] for row, keep in zip(p, ~bad)]
        rows_s = [row[keep] for row, keep in zip(s, ~bad)]
        return (*_finish_ragged(rows_p, rows_s, names), one_prompt)
    return p, s, one_prompt


def _paired_ragged(proxy, score, nan_policy, names):
    p_name, s_name = names
    if not (isinstance(proxy, Sequence) and isinstance(score, Sequence)):
        raise ValueError(f"ragged {p_name} and {s_name} must both be lists of 1-D arrays")
    if len(proxy) != len(score):
        raise ValueError(f"{p_name} has {len(proxy)} prompts but {s_name} has {len(score)}")
    rows_p, rows_s = [], []
    for i, (row_p, row_s) in enumerate(zip(proxy, score)):
        a = _to_float_array(row_p, f"{p_name}[{i}]")
        b = _to_float_array(row_s, f"{s_name}[{i}]")
        if a.ndim != 1 or a.shape != b.shape:
            raise ValueError(
                f"prompt {i}: {p_name}[{i}] and {s_name}[{i}] must be 1-D of equal length, "
                f"got shapes {a.shape} and {b.shape}"
            )
        bad = ~(np.isfinite(a) & np.isfinite(b))
        if bad.any():
            if nan_policy == "raise":
                which, arr = (p_name, a) if (~np.isfinite(a)).any() else (s_name, b)
                raise ValueError(
                    _describe_bad(~np.isfinite(arr), which, ragged_row=i)
                    + "; clean them, or pass nan_policy='omit' to drop those samples"
                )
            a, b = a[~bad], b[~bad]
        rows_p.append(a)
        rows_s.append(b)
    return (*_finish_ragged(rows_p, rows_s, names), False)


def _finish_ragged(rows_p, rows_s, names):
    if not rows_p:
        raise ValueError(f"{names[0]} and {names[1]} are empty: need at least one prompt")
    if all(len(r) == 0 for r in rows_p):
        raise ValueError(f"{names[0]} and {names[1]} have no finite samples at all")
    return rows_p, rows_s


def sample_counts(rows: np.ndarray | list[np.ndarray]) -> np.ndarray:
    if isinstance(rows, np.ndarray):
        return np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
    return np.array([len(r) for r in rows], dtype=np.int64)


def check_ns(ns: object, max_n: int) -> tuple[np.ndarray, bool]:
    """Validate the best-of-n grid. Returns ``(ns as int64 array, was_scalar)``."""
    scalar = np.ndim(ns) == 0
    try:
        arr = np.atleast_1d(np.asarray(ns))
    except (TypeError, ValueError) as err:
        raise TypeError(f"ns must be an integer or a sequence of integers: {err}") from err
    if arr.size == 0:
        raise ValueError("ns is empty: give at least one n")
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_):
        raise TypeError(f"ns must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise TypeError(f"ns must be whole numbers, got {arr.tolist()}")
    arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ns must be 1-D, got shape {arr.shape}")
    if np.any(arr < 1):
        raise ValueError(f"every n must be >= 1, got {arr[arr < 1].tolist()}")
    if np.any(arr > max_n):
        raise ValueError(
            f"n cannot exceed the number of samples per prompt N = {max_n}; got n = {arr[arr > max_n].tolist()}"
        )
    return arr, scalar
