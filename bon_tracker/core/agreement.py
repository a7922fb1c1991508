"""Does the proxy still agree with the truth where selection looks?

Best-of-n selection only ever looks at the top of each prompt's samples by proxy. Rank
agreement (Spearman) between proxy and true *within* that top -- all samples, the top 1/2,
1/4, ... down to the top few -- shows whether the proxy still orders the samples that
selection actually chooses between. Agreement falling in the tail while it holds over all
samples is the mechanism of regressional Goodhart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TopAgreement:
    """Spearman agreement of proxy and true among each prompt's top samples by proxy.

    One entry per fraction ``q``: ``n_top`` samples per prompt (``floor(q N)``), the mean over
    prompts of the per-prompt Spearman correlation, its standard error (sd over prompts,
    ddof = 1, over sqrt of the count) and the number of prompts it averages (prompts
    whose top samples are all tied in proxy or in true have no correlation and are left out).
    """

    q: tuple[float, ...]
    n_top: tuple[int, ...]
    mean: tuple[float, ...]
    se: tuple[float, ...]
    n_prompts: tuple[int, ...]

    def metrics(self, prefix: str = "bon") -> dict[str, float]:
        """``{prefix}/8_agreement/top{q}`` -> mean Spearman (``top1`` is all samples,
        ``top0_25`` the top quarter): the tracker's metric names.

        Example:
            >>> agreement = topq_agreement([[0.1, 0.2, 0.3, 0.4]], [[1.0, 2.0, 3.0, 4.0]], min_samples=2)
            >>> agreement.metrics()
            {'bon/8_agreement/top1': 1.0, 'bon/8_agreement/top0_5': 1.0}
        """
        return {f"{prefix}/{AGREEMENT_SECTION}/{agreement_label(q)}": m for q, m in zip(self.q, self.mean)}

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in asdict(self).items()}


# The agreement section of the metric names: bon_tracker.record.METRIC_SECTIONS["agreement"].
AGREEMENT_SECTION = "8_agreement"


def agreement_label(q: float) -> str:
    """The leaf of a top-q agreement metric: ``top`` and q with ``_`` for the decimal point
    (W&B reads ``.`` in a key as nesting); as text these sort in the numeric order of q.

    >>> [agreement_label(q) for q in (1.0, 0.5, 0.25, 0.0625)]
    ['top1', 'top0_5', 'top0_25', 'top0_0625']
    """
    return "top" + f"{float(q):g}".replace(".", "_")


def _ranks(x: np.ndarray, tie_free: bool = False) -> np.ndarray:
    """Average ranks along rows (ties share their mean rank); ordinal ranks when tie-free
    (``tie_free``: known to be, so not checked)."""
    order = np.argsort(x, axis=1)
    if not tie_free and _has_tie(np.take_along_axis(x, order, axis=1)):
        from scipy.stats import rankdata  # scipy.stats takes ~1.5 s to import: only when used

        return rankdata(x, axis=1)
    # The inverse permutation, scattered: the same ranks as a second argsort, 2.5x faster.
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(x.shape[1], dtype=np.float64), x.shape), axis=1)
    return ranks


def _has_tie(sorted_rows: np.ndarray) -> bool:
    return bool(np.any(sorted_rows[:, 1:] == sorted_rows[:, :-1]))


def _spearman_rows(proxy_desc: np.ndarray, true: np.ndarray, true_tie_free: bool = False) -> np.ndarray:
    """Spearman correlation of each row pair (average ranks for ties); NaN for constant rows.

    ``proxy_desc`` rows are sorted descending, so tie-free proxy ranks need no sort;
    ``true_tie_free``: no row of ``true`` has a tie (not checked again).
    """
    m = proxy_desc.shape[1]
    if _has_tie(proxy_desc):
        from scipy.stats import rankdata

        rp = rankdata(proxy_desc, axis=1)
    else:
        rp = np.broadcast_to(np.arange(m, 0, -1, dtype=np.float64), proxy_desc.shape)
    rt = _ranks(true, tie_free=true_tie_free)
    rp = rp - rp.mean(axis=1, keepdims=True)
    rt -= rt.mean(axis=1, keepdims=True)
    num = (rp * rt).sum(axis=1)
    den = np.sqrt((rp * rp).sum(axis=1) * (rt * rt).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _best_first(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted by proxy descending, ties in their original order: ``(sorted, order)``.

    A stable sort costs 4-6 times the default one; a row without ties has one order whichever
    sort finds it, so only the rows with a tie are sorted again, stably."""
    negated = -p
    order = np.argsort(negated, axis=1)
    p_sorted = np.take_along_axis(p, order, axis=1)
    tied = np.flatnonzero((p_sorted[:, 1:] == p_sorted[:, :-1]).any(axis=1))
    if tied.size:
        order[tied] = np.argsort(negated[tied], axis=1, kind="stable")
        p_sorted[tied] = np.take_along_axis(p[tied], order[tied], axis=1)
    return p_sorted, order


def topq_agreement(proxy: object, true: object, *, min_samples: int = 4) -> TopAgreement:
    """Rank agreement of proxy and true among the top fraction of each prompt's samples.

    For ``q = 1, 1/2, 1/4, ...`` while ``floor(q N) >= min_samples``: per prompt, keep the
    ``floor(q N)`` samples with the highest proxy (ties at the cut kept in a fixed order), and
    take Spearman's correlation of proxy and true among them; average over prompts with a
    standard error.

    Args:
        proxy: proxy scores ``(P, N)`` (every prompt the same N; finite).
        true: true scores, same shape.
        min_samples: the smallest top kept (Spearman needs a few points to mean anything).

    Returns:
        A :class:`TopAgreement`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> proxy = rng.normal(size=(500, 64))
        >>> agreement = topq_agreement(proxy, proxy + 0.5 * rng.normal(size=(500, 64)))
        >>> agreement.q[:3], agreement.n_top[:3], agreement.n_top[-1]
        ((1.0, 0.5, 0.25), (64, 32, 16), 4)
        >>> agreement.mean[0] > agreement.mean[-1]  # selection among similar proxies: less agreement
        True
    """
    p = np.asarray(proxy, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.ndim == 1:
        p, t = p[None, :], t[None, :]
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"proxy and true must be (P, N) arrays of the same shape, got {p.shape} and {t.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
        raise ValueError("proxy and true must be finite")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
        raise ValueError(f"min_samples must be an integer >= 2, got {min_samples!r}")
    N = p.shape[1]
    p_sorted, order = _best_first(p)
    t_sorted = np.take_along_axis(t, order, axis=1)
    # Without a tie in a whole row there is none among its top samples: one check, not one per q.
    true_tie_free = not _has_tie(np.sort(t, axis=1))
    qs, tops, means, ses, counts = [], [], [], [], []
    q = 1.0
    while (m := math.floor(q * N)) >= min_samples:
        rho = _spearman_rows(p_sorted[:, :m], t_sorted[:, :m], true_tie_free)
        ok = rho[np.isfinite(rho)]
        qs.append(q)
        tops.append(m)
        counts.append(int(ok.size))
        means.append(float(ok.mean()) if ok.size else math.nan)
        ses.append(float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size >= 2 else math.nan)
        q /= 2.0
    return TopAgreement(tuple(qs), tuple(tops), tuple(means), tuple(ses), tuple(counts))
