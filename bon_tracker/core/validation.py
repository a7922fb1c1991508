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

# The most points of an n grid (``ns``) one call accepts. Each n costs work over every
# sample (its weights reach down to rank ~737 N / n), so a grid of every n up to a large N
# is minutes of work for a curve that 16 or 32 points describe; the tracker allows 4096.
MAX_NS = 1 << 14  # 16,384
_FLOAT_MAX = float(np.finfo(np.float64).max)


def describe_number(value: object) -> str:
    """A number for an error message: huge integers by their size (never thousands of digits,
    and never wrapped around as a fixed-width integer would be).

    >>> describe_number(2**63), describe_number(10**400), describe_number(1.5)
    ('9223372036854775808', 'an integer of 401 digits', '1.5')
    """
    if isinstance(value, (bool, np.bool_)):
        return repr(bool(value))
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if value.bit_length() > 100:
            digits = len(str(abs(value))) if value.bit_length() < 13_000 else int(value.bit_length() * 0.30103) + 1
            return f"an integer of {digits} digits"
        return str(value)
    return repr(float(value)) if isinstance(value, (float, np.floating)) else repr(value)


def as_float(value: object, name: str) -> float:
    """A real scalar as a float, with a ``TypeError`` for complex and non-numbers and a
    ``ValueError`` naming ``name`` when it is too large for a float (``10**400``).

    >>> as_float(3, "policy_kl")
    3.0
    """
    if hasattr(value, "item") and np.ndim(value) == 0:  # numpy scalars, 0-d arrays and tensors
        value = value.item()
    if isinstance(value, (complex, np.complexfloating)):
        raise TypeError(f"{name} must be a real number, got the complex value {value!r}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name} = {describe_number(value)} is too large for a float (at most about {_FLOAT_MAX:.3g})"
        ) from None


def _object_to_float(array: np.ndarray, name: str, none_is_missing: bool = False) -> np.ndarray:
    """An object array (nested lists holding huge integers, complex numbers, ...) as float64,
    or an error naming the first value that is not a real number a float can hold."""
    out = np.empty(array.shape, dtype=np.float64)
    for index in np.ndindex(array.shape):
        item = array[index]
        where = name if not index else f"{name} at {index if len(index) != 1 else index[0]}"
        if isinstance(item, (complex, np.complexfloating)):
            raise TypeError(f"{where} is the complex value {item!r}: scores must be real-valued")
        if item is None and none_is_missing:  # a reward function's "no score", as TRL's nansum reads it
            out[index] = np.nan
            continue
        if not isinstance(item, (int, float, np.integer, np.floating, np.bool_)):
            raise TypeError(f"{name} must be numeric, got a {type(item).__name__} at {index}")
        try:
            out[index] = float(item)
        except OverflowError:
            raise ValueError(
                f"{where} is {describe_number(item)}: too large for a float (at most about {_FLOAT_MAX:.3g})"
            ) from None
    return out


def _to_float_array(values: object, name: str, none_is_missing: bool = False) -> np.ndarray:
    """Convert array-likes (lists, numpy, CPU/CUDA tensors) to a float64 array.

    Complex values (numpy, tensors, or inside nested lists) are a ``TypeError`` -- casting
    would drop their imaginary part; an integer too large for a float is a ``ValueError``
    naming it.
    """
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch tensors, duck-typed
        is_complex = getattr(values, "is_complex", None)
        if callable(is_complex) and is_complex():
            raise TypeError(f"{name} must be real-valued, got a complex tensor (dtype {values.dtype})")
        values = values.detach().cpu().double().numpy()  # also bfloat16, which numpy lacks
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as err:  # e.g. inhomogeneous nested lists
        raise TypeError(f"{name} could not be converted to a numeric array: {err}") from err
    if np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real-valued, got dtype {array.dtype}")
    if array.dtype == object:
        return _object_to_float(array, name, none_is_missing)
    if not (np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)):
        raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def float_array(values: object, name: str) -> np.ndarray:
    """:func:`_to_float_array` for the core's other numeric inputs (KL values, grids of n to
    predict at, ...): float64, with the same clear errors for complex and overflowing values."""
    return _to_float_array(values, name)


def _all_finite(array: np.ndarray) -> bool:
    """Fast path: a finite sum means every value is finite (NaN and inf propagate);
    only an overflowing sum needs the element-wise check."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None)):
            return True
    return bool(np.isfinite(array).all())


def plain_float64_matrices(a: object, b: object) -> bool:
    """Both are non-empty ``(P, N)`` float64 numpy arrays of one shape: what full validation
    returns unchanged when their values are finite (not checked here)."""
    return (
        type(a) is np.ndarray
        and type(b) is np.ndarray
        and a.dtype == np.float64
        and b.dtype == np.float64
        and a.ndim == 2
        and a.shape == b.shape
        and a.size > 0
    )


def _finite_float64_matrices(a: object, b: object) -> bool:
    """:func:`plain_float64_matrices` holding only finite values."""
    return plain_float64_matrices(a, b) and _all_finite(a) and _all_finite(b)


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
    return f"{name} has {count} non-finite value(s) (NaN, inf or None: missing) at (prompt, sample) {shown}{more}"


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
    if _finite_float64_matrices(proxy, score):  # the common case, checked in a few microseconds
        return proxy, score, False  # type: ignore[return-value]
    p_name, s_name = names
    if _is_ragged(proxy) or _is_ragged(score):
        return _paired_ragged(proxy, score, nan_policy, names)

    p = _to_float_array(proxy, p_name, none_is_missing=True)
    s = _to_float_array(score, s_name, none_is_missing=True)
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
        a = _to_float_array(row_p, f"{p_name}[{i}]", none_is_missing=True)
        b = _to_float_array(row_s, f"{s_name}[{i}]", none_is_missing=True)
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


def _values(values: Sequence[object], limit: int = 5) -> str:
    shown = ", ".join(describe_number(v) for v in list(values)[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def check_ns(ns: object, max_n: int) -> tuple[np.ndarray, bool]:
    """Validate the best-of-n grid. Returns ``(ns as int64 array, was_scalar)``.

    At most :data:`MAX_NS` points. Values are checked before any conversion to int64, so an
    error shows the value given (``2**63``, ``10**400``), never a wrapped-around one.
    """
    scalar = np.ndim(ns) == 0
    try:
        arr = np.atleast_1d(np.asarray(ns))
    except (TypeError, ValueError) as err:
        raise TypeError(f"ns must be an integer or a sequence of integers: {err}") from err
    if arr.size == 0:
        raise ValueError("ns is empty: give at least one n")
    if arr.ndim != 1:
        raise ValueError(f"ns must be 1-D, got shape {arr.shape}")
    if arr.size > MAX_NS:
        raise ValueError(
            f"ns has {arr.size:,} points; at most {MAX_NS:,} are supported "
            "(bon_tracker.core.validation.MAX_NS): each n costs work over every sample, and a few dozen "
            "points describe a curve -- use e.g. powers of two (the default) or a geometric grid"
        )
    if arr.dtype == object:  # Python integers beyond 64 bits, or a mix of types
        items = arr.tolist()
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
            kinds = sorted({type(v).__name__ for v in items})
            raise TypeError(f"ns must be integers, got values of type {', '.join(kinds)}")
        values = [int(v) for v in items]
        small = [v for v in values if v < 1]
        if small:
            raise ValueError(f"every n must be >= 1, got {_values(small)}")
        big = [v for v in values if v > max_n]
        if big:
            raise ValueError(f"n cannot exceed the number of samples per prompt N = {max_n}; got n = {_values(big)}")
        return np.array(values, dtype=np.int64), scalar
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"ns must be integers, got complex values (dtype {arr.dtype})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_):
        raise TypeError(f"ns must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise TypeError(f"ns must be whole numbers, got {arr.tolist()}")
    # range checks in the given dtype (uint64 2**63, float 1e300): int64 would wrap them around
    if np.any(arr < 1):
        raise ValueError(f"every n must be >= 1, got {_values(arr[arr < 1].tolist())}")
    if np.any(arr > max_n):
        big = _values(arr[arr > max_n].tolist())
        raise ValueError(f"n cannot exceed the number of samples per prompt N = {max_n}; got n = {big}")
    return arr.astype(np.int64), scalar
