"""Selection rules over reward-model ensembles, and the checking of several proxies and true rewards.

A *selection rule* says which of a prompt's candidates is picked: the one with the highest
*selection score*. With K proxy reward models ("members") per sample the selection score is
an aggregate over members, computed per sample before any selection (Coste et al. 2023,
arXiv 2310.02743; Eisenstein et al. 2023, arXiv 2312.09244):

* ``mean``:  the mean over members;
* ``worst``: the minimum over members (worst-case optimisation, WCO);
* ``uwo``:   uncertainty-weighted optimisation, ``mean - lam * var`` with the *population*
  variance over members (divide by K, as Coste et al.'s formula
  ``1/k sum_i (R_i - mean)^2``); ``lam`` default :data:`DEFAULT_UWO_LAMBDA`;
* each member alone, by its name.

The curve of a rule is then the plain exact best-of-n estimator on the aggregate, so ties in
the aggregate are handled exactly as :func:`~bon_tracker.core.curve.bon_curve` handles them.

Inputs are normalised here (as :mod:`bon_tracker.core.validation` does for one proxy):

* dense: members ``(K, P, N)`` and true rewards ``(T, P, N)`` float64 arrays;
* ragged: one ``(K, N_p)`` and one ``(T, N_p)`` array per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bon_tracker.core.validation import NanPolicy, check_nan_policy, float_array

ENSEMBLE_RULES = ("mean", "worst", "uwo")
# Coste et al. 2023 penalise the intra-ensemble variance with a coefficient lambda; they
# report UWO as robust to its value. 0.5 is the value we use by default (configurable).
DEFAULT_UWO_LAMBDA = 0.5
# Bounds that keep one eval's selection statistics small (the record stays bounded).
MAX_MEMBERS = 32
MAX_TRUE_REWARDS = 8

Rows = np.ndarray | list[np.ndarray]


@dataclass(frozen=True)
class SelectionInput:
    """Checked members and true rewards of one eval.

    ``members`` is ``(K, P, N)`` (dense) or a list of ``(K, N_p)`` arrays (ragged);
    ``trues`` likewise with T true rewards. Samples are paired across all of them.
    """

    member_names: tuple[str, ...]
    true_names: tuple[str, ...]
    members: Rows
    trues: Rows

    @property
    def dense(self) -> bool:
        return isinstance(self.members, np.ndarray)

    @property
    def n_prompts(self) -> int:
        return self.members.shape[1] if self.dense else len(self.members)

    def sample_counts(self) -> np.ndarray:
        if self.dense:
            return np.full(self.members.shape[1], self.members.shape[2], dtype=np.int64)
        return np.array([row.shape[1] for row in self.members], dtype=np.int64)


def _is_row_list(value: object) -> bool:
    """A plain sequence (not an array or tensor) whose items have a length: rows of a ragged input."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) > 0
        and all(hasattr(item, "__len__") and not isinstance(item, (str, bytes)) for item in value)
    )


def _as_member(value: object, where: str) -> np.ndarray | list[np.ndarray]:
    """One member's scores as a ``(P, N)`` float array or a list of 1-D float arrays."""
    if _is_row_list(value):
        lengths = {len(row) for row in value}  # type: ignore[union-attr]
        if len(lengths) > 1 or any(not isinstance(row, (list, tuple, np.ndarray)) for row in value):
            rows = [float_array(row, f"{where} prompt {i}") for i, row in enumerate(value)]
            for i, row in enumerate(rows):
                if row.ndim != 1:
                    raise ValueError(f"{where} prompt {i} must be 1-D (its samples), got shape {row.shape}")
            return rows
    array = float_array(value, where)
    if array.ndim == 1:  # one prompt
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{where} must be (prompts, samples) or a list of 1-D prompts, got shape {array.shape}")
    return array


def _split_named(scores: object, kind: str, default_name: str) -> tuple[list[str], list[object]]:
    """``(names, per-member values)`` of a mapping, a ``(K, P, N)`` array, a list of members or one member."""
    if isinstance(scores, Mapping):
        if not scores:
            raise ValueError(f"{kind} is an empty mapping: give at least one {{name: scores}}")
        names = []
        for name in scores:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{kind} names must be non-empty strings, got {name!r}")
            names.append(name)
        return names, list(scores.values())
    if hasattr(scores, "detach") or isinstance(scores, np.ndarray):
        array = float_array(scores, kind)
        if array.ndim == 3:
            return [f"{default_name}_{k}" for k in range(array.shape[0])], list(array)
        return [default_name], [array]
    if _is_row_list(scores):
        first = scores[0]  # type: ignore[index]
        if _is_row_list(first) or (isinstance(first, np.ndarray) and first.ndim == 2) or hasattr(first, "detach"):
            # a list of members, each (P, N) or a list of rows
            return [f"{default_name}_{k}" for k in range(len(scores))], list(scores)  # type: ignore[arg-type]
    return [default_name], [scores]


def _normalise(scores: object, kind: str, default_name: str) -> tuple[list[str], list]:
    names, values = _split_named(scores, kind, default_name)
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names must be distinct, got {names}")
    return names, [_as_member(value, f"{kind} {name!r}") for name, value in zip(names, values)]


def _check_same_shape(names: list[str], members: list, kind: str, ref: tuple[str, object] | None = None) -> None:
    """Every member has the first one's prompts and samples per prompt; errors name member and prompt."""
    ref_name, ref_value = ref if ref is not None else (f"{kind} {names[0]!r}", members[0])
    dense = isinstance(ref_value, np.ndarray) and all(isinstance(m, np.ndarray) for m in members)
    if dense and all(m.shape == ref_value.shape for m in members):
        return  # the dense fast path: one shape comparison per member
    ref_counts = [len(row) for row in ref_value]
    for name, member in zip(names, members):
        counts = [len(row) for row in member]
        if len(counts) != len(ref_counts):
            raise ValueError(f"{kind} {name!r} has {len(counts)} prompts but {ref_name} has {len(ref_counts)}")
        for prompt, (a, b) in enumerate(zip(counts, ref_counts)):
            if a != b:
                raise ValueError(f"{kind} {name!r} prompt {prompt} has {a} samples but {ref_name} has {b}")


def _describe_non_finite(kind: str, name: str, mask: np.ndarray) -> str:
    where = np.argwhere(mask)
    shown = ", ".join(str(tuple(int(i) for i in idx)) for idx in where[:5])
    more = f" (first 5 of {len(where)})" if len(where) > 5 else ""
    return (
        f"{kind} {name!r} has {len(where)} non-finite value(s) (NaN, inf or None: missing) at "
        f"(prompt, sample) {shown}{more}; clean them, or pass nan_policy='omit' to drop those samples"
    )


def _stack(members: list) -> Rows:
    """Members as one ``(K, P, N)`` array when every member is dense, else ``(K, N_p)`` per prompt."""
    if all(isinstance(m, np.ndarray) for m in members):
        return np.ascontiguousarray(np.stack(members))
    P = len(members[0])
    return [np.stack([np.asarray(m[p], dtype=np.float64) for m in members]) for p in range(P)]


def _finite_mask(stacked: Rows) -> np.ndarray | list[np.ndarray] | None:
    """None when every value is finite (one sum, the fast path); else the elementwise finite mask."""
    if isinstance(stacked, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(stacked, axis=None)):
                return None
        return np.isfinite(stacked)
    masks = [np.isfinite(row) for row in stacked]
    return None if all(m.all() for m in masks) else masks


def _check_finite(kind: str, names: list[str], stacked: Rows, nan_policy: NanPolicy):
    """The per-sample keep mask ``(P, N)`` or per-prompt ``(N_p,)`` (None: keep all); raises under "raise"."""
    mask = _finite_mask(stacked)
    if mask is None:
        return None
    if nan_policy == "raise":
        for k, name in enumerate(names):
            if isinstance(mask, np.ndarray):
                bad = ~mask[k]
            else:
                bad = np.zeros((len(mask), max((m.shape[1] for m in mask), default=0)), dtype=bool)
                for p, m in enumerate(mask):
                    bad[p, : m.shape[1]] = ~m[k]
            if bad.any():
                raise ValueError(_describe_non_finite(kind, name, bad))
    if isinstance(mask, np.ndarray):
        return mask.all(axis=0)
    return [m.all(axis=0) for m in mask]


def check_members(
    proxy: object, *, nan_policy: NanPolicy = "raise", kind: str = "proxy"
) -> tuple[tuple[str, ...], Rows]:
    """Validate several proxies (ensemble members) given per sample.

    Accepted: a mapping ``{name: (P, N) or ragged list}``, an array ``(K, P, N)``, a list of
    members (each ``(P, N)`` or a ragged list of rows), or one proxy ``(P, N)`` / ragged list.
    Every member must have the same prompts and samples per prompt (ragged allowed).

    Args:
        proxy: the members' scores.
        nan_policy: ``"raise"`` (default): a non-finite value is a ``ValueError`` naming the
            member, the prompt and the sample; ``"omit"``: a sample is dropped from every member
            where any member is non-finite.
        kind: the word used in error messages.

    Returns:
        ``(names, rows)``: rows ``(K, P, N)`` float64 or a list of ``(K, N_p)`` arrays.

    Example:
        >>> names, rows = check_members({"a": [[1.0, 2.0]], "b": [[0.5, 0.0]]})
        >>> names, rows.shape
        (('a', 'b'), (2, 1, 2))
    """
    check_nan_policy(nan_policy)
    names, members = _normalise(proxy, kind, "member" if kind == "proxy" else kind)
    if len(names) > MAX_MEMBERS:
        raise ValueError(f"{kind} has {len(names)} members; at most {MAX_MEMBERS} are supported")
    _check_same_shape(names, members, kind)
    stacked = _stack(members)
    keep = _check_finite(kind, names, stacked, nan_policy)
    if keep is not None:
        stacked = _omit(stacked, keep)
    _check_not_empty(stacked, kind)
    return tuple(names), stacked


def _omit(stacked: Rows, keep) -> list[np.ndarray]:
    if isinstance(stacked, np.ndarray):
        return [stacked[:, p][:, keep[p]] for p in range(stacked.shape[1])]
    return [row[:, k] for row, k in zip(stacked, keep)]


def _check_not_empty(stacked: Rows, kind: str) -> None:
    if isinstance(stacked, np.ndarray):
        if stacked.shape[1] == 0 or stacked.shape[2] == 0:
            raise ValueError(f"{kind} is empty (shape {stacked.shape[1:]}): need at least one sample")
        return
    if not stacked or all(row.shape[1] == 0 for row in stacked):
        raise ValueError(f"{kind} has no finite samples at all")


def selection_input(proxy: object, true: object, *, nan_policy: NanPolicy = "raise") -> SelectionInput:
    """Members and true rewards checked together: same prompts and samples, one NaN policy.

    ``true`` takes the same forms as ``proxy`` (:func:`check_members`); one ``(P, N)`` array is
    the true reward named ``"true"``. With ``nan_policy="omit"`` a sample is dropped where any
    member or any true reward is non-finite.

    Example:
        >>> inp = selection_input({"a": [[1.0, 2.0, 0.0]]}, {"gold": [[0.0, 1.0, 1.0]]})
        >>> inp.member_names, inp.true_names, inp.trues.shape
        (('a',), ('gold',), (1, 1, 3))
    """
    check_nan_policy(nan_policy)
    names, members = _normalise(proxy, "proxy", "member")
    true_names, trues = _normalise(true, "true", "true")
    if len(names) > MAX_MEMBERS:
        raise ValueError(f"proxy has {len(names)} members; at most {MAX_MEMBERS} are supported")
    if len(true_names) > MAX_TRUE_REWARDS:
        raise ValueError(f"true has {len(true_names)} rewards; at most {MAX_TRUE_REWARDS} are supported")
    _check_same_shape(names, members, "proxy")
    _check_same_shape(true_names, trues, "true", ref=(f"proxy {names[0]!r}", members[0]))
    stacked_members, stacked_trues = _stack(members), _stack(trues)
    if isinstance(stacked_members, np.ndarray) != isinstance(stacked_trues, np.ndarray):
        stacked_members, stacked_trues = _as_ragged(stacked_members), _as_ragged(stacked_trues)
    keep_p = _check_finite("proxy", names, stacked_members, nan_policy)
    keep_t = _check_finite("true", true_names, stacked_trues, nan_policy)
    if keep_p is not None or keep_t is not None:
        keep = _and_masks(keep_p, keep_t)
        stacked_members, stacked_trues = _omit(stacked_members, keep), _omit(stacked_trues, keep)
    _check_not_empty(stacked_members, "proxy")
    return SelectionInput(tuple(names), tuple(true_names), stacked_members, stacked_trues)


def _as_ragged(stacked: Rows) -> list[np.ndarray]:
    if isinstance(stacked, np.ndarray):
        return [stacked[:, p] for p in range(stacked.shape[1])]
    return stacked


def _and_masks(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, np.ndarray):
        return a & b
    return [x & y for x, y in zip(a, b)]


def aggregate_members(
    scores: np.ndarray, rule: str, uwo_lambda: float = DEFAULT_UWO_LAMBDA, *, snap: bool = True
) -> np.ndarray:
    """The selection score of an ensemble rule, over the leading (member) axis of ``scores``.

    .. math:: \\text{mean}: \\bar R = \\tfrac1K \\sum_k R_k, \\quad \\text{worst}: \\min_k R_k,
              \\quad \\text{uwo}: \\bar R - \\lambda \\tfrac1K \\sum_k (R_k - \\bar R)^2

    Example:
        >>> s = np.array([[1.0, 4.0], [3.0, 0.0]])  # 2 members x 2 samples
        >>> [aggregate_members(s, r).tolist() for r in ("mean", "worst", "uwo")]
        [[2.0, 2.0], [1.0, 0.0], [1.5, 0.0]]
    """
    if rule == "worst":
        return scores.min(axis=0)  # a member's own value: no rounding
    if rule == "mean":
        out = scores.mean(axis=0)
    elif rule == "uwo":
        out = scores.mean(axis=0) - float(uwo_lambda) * scores.var(axis=0)  # population variance (ddof=0)
    else:
        raise ValueError(f"unknown ensemble rule {rule!r}; known: {', '.join(ENSEMBLE_RULES)}")
    return snap_ties(out) if snap else out
    raise ValueError(f"unknown ensemble rule {rule!r}; known: {', '.join(ENSEMBLE_RULES)}")


def snap_ties(values: np.ndarray, top: float | None = None) -> np.ndarray:
    """Values rounded to a power-of-two grid 2^-40 below their largest magnitude (about 1e-12 relative).

    Aggregates of discrete members that are equal in exact arithmetic (e.g. UWO of (0, 0, 2) and
    (0, 1, 0): both 2/9) can differ by an ulp when computed along different paths; best-of-n must
    see them as the tie they are. The grid is a power of two, so snapping is exact and moves a
    value by at most 5e-13 of the scores' scale. (Two values straddling a grid midpoint can still
    split, with a chance of about an ulp over the grid step.)

    >>> a = np.array([0, 0, 2.0]); b = np.array([0, 1, 0.0])
    >>> u = snap_ties(np.array([a.mean() - 0.5 * a.var(), b.mean() - 0.5 * b.var()]))
    >>> bool(u[0] == u[1])
    True
    """
    if top is None:
        finite = values[np.isfinite(values)]
        top = float(np.max(np.abs(finite))) if finite.size else 0.0
    if top == 0.0 or not math.isfinite(top):
        return values
    step = math.ldexp(1.0, math.frexp(top)[1] - 40)  # ``top``: the largest magnitude (one grid for all prompts)
    return np.round(values / step) * step


def default_rules(member_names: Sequence[str]) -> tuple[str, ...]:
    """Every member alone, then ``mean``, ``worst``, ``uwo`` when there are two members or more."""
    names = tuple(member_names)
    return names + (ENSEMBLE_RULES if len(names) > 1 else ())


def check_rules(rules: Sequence[str] | None, member_names: Sequence[str]) -> tuple[str, ...]:
    """The rules to evaluate: each an ensemble rule or a member name; errors list what is known."""
    names = tuple(member_names)
    clash = sorted(set(names) & set(ENSEMBLE_RULES))
    if clash and len(names) > 1:
        raise ValueError(f"member names {clash} clash with the ensemble rules {ENSEMBLE_RULES}: rename those members")
    if rules is None:
        return default_rules(names)
    if isinstance(rules, str):
        rules = (rules,)
    out = tuple(rules)
    if not out:
        raise ValueError("rules is empty: give at least one rule")
    known = names + ENSEMBLE_RULES
    for rule in out:
        if rule not in known:
            raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(known)}")
    if len(set(out)) != len(out):
        raise ValueError(f"rules must be distinct, got {list(out)}")
    return out


def rule_scores(inp: SelectionInput, rule: str, uwo_lambda: float = DEFAULT_UWO_LAMBDA) -> Rows:
    """The selection score of ``rule`` per sample: ``(P, N)`` or a list of ``(N_p,)`` arrays."""
    if rule in inp.member_names and not (rule in ENSEMBLE_RULES and len(inp.member_names) > 1):
        k = inp.member_names.index(rule)
        return inp.members[k] if inp.dense else [row[k] for row in inp.members]
    if inp.dense:
        return aggregate_members(inp.members, rule, uwo_lambda)
    if rule == "worst":
        return [row.min(axis=0) for row in inp.members]
    raw = [aggregate_members(row, rule, uwo_lambda, snap=False) for row in inp.members]
    top = max((float(np.max(np.abs(r))) for r in raw if r.size), default=0.0)
    return [snap_ties(r, top) for r in raw]  # one grid for every prompt, as for dense input
