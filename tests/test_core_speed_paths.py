"""The per-prompt estimates on bon_curve's path (bon_curve_parts, bon_estimate) and the fast paths
of issue 18 (flat index arrays for short rows, kept rankers and weights, the huge-N layout)."""

from __future__ import annotations

import itertools
import math
import threading
import time
from fractions import Fraction

import numpy as np
import pytest

from bon_tracker.core import bon_curve, bon_curve_parts, bon_estimate, default_ns
from bon_tracker.core.curve import SCAN_MIN_N
from bon_tracker.core.threads import map_in_order
from tests import brute_force


def exact_estimates(proxy: np.ndarray, score: np.ndarray, ns) -> list[float]:
    """Independent: exact integer binomials over a stable argsort, tie groups averaged, per n."""
    order = np.argsort(proxy, kind="stable")
    p, values = proxy[order], [Fraction(float(v)) for v in score[order]]
    N = len(p)
    i = 0
    while i < N:  # every member of a tie group gets the group's mean
        j = i
        while j + 1 < N and p[j + 1] == p[i]:
            j += 1
        values[i : j + 1] = [sum(values[i : j + 1], Fraction(0)) / (j - i + 1)] * (j - i + 1)
        i = j + 1
    out = []
    for n in ns:
        total = math.comb(N, n)
        out.append(float(sum(Fraction(math.comb(k - 1, n - 1), total) * values[k - 1] for k in range(n, N + 1))))
    return out


def exact_matrix(proxy: np.ndarray, score: np.ndarray, ns) -> np.ndarray:
    return np.array([exact_estimates(p, s, ns) for p, s in zip(proxy, score)])


def check_parts(proxy, true, ns=None, **kwargs) -> None:
    """bon_curve_parts: the curve is bon_curve's, the matrices bon_estimate's, and the curve their mean and SE."""
    parts = bon_curve_parts(proxy, true, ns, **kwargs)
    curve = bon_curve(proxy, true, ns, **kwargs)
    for field in ("n", "kl", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts"):
        np.testing.assert_array_equal(getattr(parts.curve, field), getattr(curve, field))
    nan_policy = kwargs.get("nan_policy", "raise")
    est_true = np.atleast_2d(bon_estimate(proxy, true, curve.n, nan_policy=nan_policy))
    # the proxy's own estimate from the same samples: omitting a pair also drops its proxy
    paired_proxy = np.where(np.isfinite(true), proxy, np.nan) if nan_policy == "omit" else proxy
    est_proxy = np.atleast_2d(bon_estimate(proxy, paired_proxy, curve.n, nan_policy=nan_policy))
    np.testing.assert_allclose(parts.true, est_true, rtol=1e-12, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(parts.proxy, est_proxy, rtol=1e-12, atol=1e-14, equal_nan=True)
    for matrix, mean, se in (
        (parts.true, curve.true_mean, curve.true_se),
        (parts.proxy, curve.proxy_mean, curve.proxy_se),
    ):
        present = ~np.isnan(matrix)
        count = present.sum(axis=0)
        np.testing.assert_array_equal(count, curve.n_prompts)
        want_mean = np.nanmean(matrix, axis=0)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-14)
        enough = count >= 2
        want_se = np.nanstd(matrix[:, enough], axis=0, ddof=1) / np.sqrt(count[enough])
        np.testing.assert_allclose(se[enough], want_se, rtol=1e-9, atol=1e-15)


# ---- bon_curve_parts ---------------------------------------------------------------------------
@pytest.mark.parametrize("P,N", [(1, 1), (3, 2), (40, 8), (25, 37), (300, 64)])
def test_parts_equal_exact_binomials_continuous_and_tied(rng, P, N):
    proxy = rng.normal(size=(P, N))
    true = proxy + rng.standard_t(2, size=(P, N))
    tied = np.round(proxy * 2) / 2  # many ties, more than the level path takes at some N
    for p in (proxy, tied):
        parts = bon_curve_parts(p, true)
        rows = range(0, P, max(1, P // 6))
        ns = parts.curve.n.tolist()
        want_true = exact_matrix(p[rows], true[rows], ns)
        want_proxy = exact_matrix(p[rows], p[rows], ns)
        np.testing.assert_allclose(parts.true[rows], want_true, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(parts.proxy[rows], want_proxy, rtol=1e-12, atol=1e-12)
        check_parts(p, true)


def test_parts_of_a_verifier_are_pass_at_k(rng):
    """Few proxy levels: the counted path; proxy = true = correct gives Chen et al.'s pass@k per problem."""
    P, N = 50, 100
    correct = (rng.random((P, N)) < rng.random((P, 1))).astype(np.float64)
    parts = bon_curve_parts(correct, correct)
    c = correct.sum(axis=1).astype(int)
    want = np.array([[brute_force.pass_at_k(N, int(ci), int(k)) for k in parts.curve.n] for ci in c])
    np.testing.assert_allclose(parts.true, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(parts.proxy, want, rtol=1e-12, atol=1e-15)
    check_parts(correct, correct)
    rating = rng.integers(1, 6, size=(P, N)).astype(float)  # a 1-5 scale, continuous true scores
    check_parts(rating, rng.normal(size=(P, N)))


def test_parts_of_ragged_prompts_and_omitted_samples(rng):
    rows_p = [rng.normal(size=k) for k in (5, 1, 12, 12, 3, 30)]
    rows_t = [rng.normal(size=len(r)) for r in rows_p]
    parts = bon_curve_parts(rows_p, rows_t)
    for i, (p, t) in enumerate(zip(rows_p, rows_t)):
        reach = parts.curve.n <= len(p)
        np.testing.assert_allclose(parts.true[i, reach], exact_estimates(p, t, parts.curve.n[reach]), rtol=1e-12)
        assert np.isnan(parts.true[i, ~reach]).all() and np.isnan(parts.proxy[i, ~reach]).all()
    check_parts(rows_p, rows_t)
    proxy = rng.normal(size=(6, 20))
    true = rng.normal(size=(6, 20))
    proxy[2, :19] = np.nan  # prompt 2 keeps one sample
    true[4, 3] = np.inf
    check_parts(proxy, true, nan_policy="omit")
    omitted = bon_curve_parts(proxy, true, nan_policy="omit")
    assert np.isnan(omitted.true[2, 1:]).all() and omitted.true[2, 0] == true[2, 19]


def test_the_trackers_parts_are_views_of_the_same_numbers_and_the_public_ones_row_major(rng):
    """finite_curve_parts (the training thread's) hands over views held by n, the numbers of
    bon_curve_parts bit for bit, several blocks and a level-counted block included; the public
    functions return C-contiguous matrices, as before."""
    from bon_tracker.core.curve import finite_curve_parts

    for P, N in ((64, 16), (9000, 64)):  # 9000 x 64: more than one block
        proxy, true = rng.normal(size=(P, N)), rng.normal(size=(P, N))
        proxy[: P // 2] = np.round(proxy[: P // 2])  # few levels in the first blocks
        fast, public = finite_curve_parts(proxy, true), bon_curve_parts(proxy, true)
        assert not fast.true.flags.c_contiguous and public.true.flags.c_contiguous
        assert public.proxy.flags.c_contiguous and bon_estimate(proxy, true, [1, 4]).flags.c_contiguous
        assert fast.true.tobytes() == public.true.tobytes() and fast.proxy.tobytes() == public.proxy.tobytes()
        rows = slice(None, None, P // 8)
        want = exact_matrix(proxy[rows], true[rows], fast.curve.n.tolist())
        np.testing.assert_allclose(fast.true[rows], want, rtol=1e-12, atol=1e-12)


def test_sorted_scores_are_lent_for_one_tie_free_block_and_give_the_same_agreement(rng):
    """finite_curve_parts(lend_sorted=True): one block without a tie in the proxy comes with each
    prompt's samples sorted by proxy, the true scores exactly the input's in that order;
    topq_agreement of them best first is the input's bit for bit (true ties included); no loan with
    a tie, several blocks or a level-counted block; given back, two buffers take turns."""
    from bon_tracker.core import topq_agreement
    from bon_tracker.core.curve import finite_curve_parts

    P, N = 700, 48
    proxy, true = rng.normal(size=(P, N)), np.round(rng.normal(size=(P, N)), 1)  # true ties
    lent = finite_curve_parts(proxy, true, lend_sorted=True).sorted
    assert lent is not None and (np.diff(lent.proxy, axis=1) > 0).all()
    order = np.argsort(proxy, axis=1)
    np.testing.assert_array_equal(lent.proxy, np.take_along_axis(proxy, order, axis=1))
    np.testing.assert_array_equal(lent.true, np.take_along_axis(true, order, axis=1))
    assert topq_agreement(lent.proxy[:, ::-1], lent.true[:, ::-1]) == topq_agreement(proxy, true)
    assert finite_curve_parts(proxy, true).sorted is None  # only when asked
    tied = proxy.copy()
    tied[5, 3] = tied[5, 7]
    assert finite_curve_parts(tied, true, lend_sorted=True).sorted is None
    big = rng.normal(size=(9000, 64))  # several blocks
    assert finite_curve_parts(big, big, lend_sorted=True).sorted is None
    levels = np.round(rng.random((P, N)) * 3)  # few proxy levels: counted, not sorted
    assert finite_curve_parts(levels, true, lend_sorted=True).sorted is None
    lent.give_back()
    seen = set()
    for _ in range(6):
        again = finite_curve_parts(proxy, true, lend_sorted=True).sorted
        np.testing.assert_array_equal(again.true, np.take_along_axis(true, order, axis=1))
        seen.add(id(again.buffer))
        again.give_back()
    assert len(seen) <= 2


def test_parts_follow_the_grid_as_given(rng):
    proxy, true = rng.normal(size=(30, 16)), rng.normal(size=(30, 16))
    ns = [16, 3, 1, 3, 8]  # unsorted, with a repeat: columns in this order, as bon_estimate's
    parts = bon_curve_parts(proxy, true, ns)
    assert parts.curve.n.tolist() == ns
    np.testing.assert_array_equal(parts.true, bon_estimate(proxy, true, ns))
    np.testing.assert_allclose(parts.true, exact_matrix(proxy, true, ns), rtol=1e-12, atol=1e-12)
    check_parts(proxy, true, ns)


def test_parts_of_huge_prompts_and_large_grids(rng):
    """One prompt past SCAN_MIN_N (block-by-block weights) and a grid of every n (tail weights)."""
    N = SCAN_MIN_N + 500
    proxy = rng.normal(size=(2, N))
    true = proxy + rng.normal(size=proxy.shape)
    check_parts(proxy, true, [1, 2, 7, 100, N])
    mid = rng.normal(size=(20, 90))
    check_parts(mid, mid + rng.normal(size=mid.shape), list(range(1, 91)))
    small = rng.normal(size=(4, 70))
    parts = bon_curve_parts(small, small * 2.0, list(range(1, 71)))
    np.testing.assert_allclose(parts.true, exact_matrix(small, small * 2.0, range(1, 71)), rtol=1e-11, atol=1e-12)


def test_bon_estimate_is_bit_identical_for_any_thread_count(rng):
    proxy = rng.normal(size=(5000, 64))
    proxy[::9, :6] = 0.5  # ties in some prompts
    score = rng.normal(size=proxy.shape)
    ns = default_ns(64)
    runs = [bon_estimate(proxy, score, ns, threads=k) for k in (1, 2, 3)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    parts = [bon_curve_parts(proxy, score, threads=k) for k in (1, 3)]
    np.testing.assert_array_equal(parts[0].true, parts[1].true)
    np.testing.assert_array_equal(parts[0].true, runs[0])


def test_bon_estimate_still_rejects_a_missing_grid_and_names_the_score():
    with pytest.raises(TypeError, match="ns must be an integer or a sequence of integers, got None"):
        bon_estimate(np.zeros(3), np.zeros(3), None)
    score = np.zeros((2, 4))
    score[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"score has 1 non-finite value\(s\).*\(1, 2\)"):
        bon_estimate(np.arange(8.0).reshape(2, 4), score, 2)


# ---- short rows: index arrays in full, ties seen over the block as one run -----------------------
@pytest.mark.parametrize("N", [1, 2, 3, 8])
def test_equal_values_across_a_row_boundary_are_no_tie(N):
    """The flat comparison looks across rows too: a row's last proxy equal to the next row's first is no tie."""
    P = 50
    proxy = np.arange(P)[:, None] * (N - 1) + np.arange(N)[None, :] * 1.0  # row i ends where row i+1 starts
    true = np.random.default_rng(N).normal(size=(P, N))
    curve = bon_curve(proxy, true)
    assert not curve.has_ties
    np.testing.assert_allclose(curve.true_mean, exact_matrix(proxy, true, curve.n).mean(axis=0), rtol=1e-12)
    tied = proxy.copy()
    if N >= 2:
        tied[7, 1] = tied[7, 0]  # one real tie, at the first two positions
        got = bon_curve_parts(tied, true)
        assert got.curve.has_ties
        np.testing.assert_allclose(got.true[7], exact_estimates(tied[7], true[7], got.curve.n), rtol=1e-12)


def test_kept_rankers_and_weights_across_shapes(rng):
    """A thread reuses its ranker (and small weights) between calls: shapes that grow, shrink and
    change N in turn must each give the exact values."""
    for P, N in [(300, 8), (20, 8), (300, 16), (3, 8), (1000, 8), (2, 5)]:
        proxy = rng.normal(size=(P, N))
        true = rng.normal(size=(P, N))
        parts = bon_curve_parts(proxy, true)
        rows = [0, P // 2, P - 1]
        np.testing.assert_allclose(
            parts.true[rows], exact_matrix(proxy[rows], true[rows], parts.curve.n), rtol=1e-12, atol=1e-12
        )


def test_default_grid_is_the_powers_of_two_and_n():
    for N in [*range(1, 70), 1023, 1024, 1025, 2**20 - 1, 2**20 + 1]:
        want = sorted({2**i for i in range(N.bit_length()) if 2**i <= N} | {N})
        assert default_ns(N).tolist() == want
        assert default_ns(N).dtype == np.int64


# ---- threads: the calling thread computes items no worker has started --------------------------------
def test_map_in_order_keeps_order_and_errors_while_the_caller_helps():
    """Results in the items' order whichever thread computes them; an error surfaces at its item."""

    def slow_square(i: int) -> int:
        time.sleep(0.002 * (i % 3))  # uneven items: workers and the caller finish out of order
        if i == 37:
            raise ArithmeticError(f"item {i}")
        return i * i

    assert list(map_in_order(slow_square, range(30), 3)) == [i * i for i in range(30)]
    seen = []
    with pytest.raises(ArithmeticError, match="item 37"):
        for value in map_in_order(slow_square, range(60), 2):
            seen.append(value)
    assert seen == [i * i for i in range(37)]
    callers = set()

    def where(i: int) -> int:
        callers.add(threading.current_thread().name)
        time.sleep(0.01)
        return i

    assert list(map_in_order(where, range(40), 2)) == list(range(40))
    assert threading.current_thread().name in callers  # the caller did not wait idle


# ---- issue 18, item 3: finiteness read off the n = 1 estimates, chunked ranks and products ---------
def brute_matrix(proxy: np.ndarray, score: np.ndarray, ns) -> np.ndarray:
    """Every n-subset enumerated (tests.brute_force), one row per prompt."""
    return np.array([[float(brute_force.bon_expected(list(p), list(s), n)) for n in ns] for p, s in zip(proxy, score)])


@pytest.mark.parametrize("where", ["proxy", "true"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("column", [0, 5, 7])
def test_a_non_finite_value_at_n8_is_found_without_its_own_pass(rng, where, value, column):
    """Dense N = 8 with ties: a NaN or infinity anywhere (column 0 keeps an infinite proxy's bits
    in its key) still gives the error naming it, and nan_policy="omit" the brute force of the rest."""
    proxy = np.round(rng.normal(size=(40, 8)) * 2) / 2  # ties in most prompts
    true = rng.normal(size=proxy.shape)
    (proxy if where == "proxy" else true)[13, column] = value
    with pytest.raises(ValueError, match=rf"{where} has 1 non-finite value\(s\).*\(13, {column}\)"):
        bon_curve(proxy, true)
    with pytest.raises(ValueError, match=rf"{where} has 1 non-finite value\(s\)"):
        bon_curve_parts(proxy, true)
    parts = bon_curve_parts(proxy, true, nan_policy="omit")
    keep = np.ones(8, dtype=bool)
    keep[column] = False
    want = brute_matrix(proxy[13:14, keep], true[13:14, keep], [1, 2, 4])
    np.testing.assert_allclose(parts.true[13, :3], want[0], rtol=1e-12, atol=1e-12)
    assert np.isnan(parts.true[13, 3])  # n = 8: the prompt has 7 samples left
    rows = [0, 20, 39]
    np.testing.assert_allclose(parts.true[rows], brute_matrix(proxy[rows], true[rows], [1, 2, 4, 8]), rtol=1e-12)


def test_grids_without_n1_still_check_every_value(rng):
    """Without n = 1 no estimate sees every sample: the checks on the ranked block stay."""
    proxy, true = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    true[4, 0] = np.nan
    proxy[4, 0] = -5.0  # ranked lowest: weight zero for every n >= 2
    with pytest.raises(ValueError, match=r"true has 1 non-finite value\(s\)"):
        bon_curve(proxy, true, ns=[2, 8])
    with pytest.raises(ValueError, match=r"score has 1 non-finite value\(s\)"):
        bon_estimate(proxy, true, [2, 8])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the sums do overflow
def test_huge_finite_scores_give_what_the_validated_path_gives(rng):
    """Sums that overflow move a block to the validated path, which must agree with the fast one."""
    proxy = rng.normal(size=(20, 8))
    true = rng.uniform(0.5, 1.0, size=proxy.shape) * 1.5e308
    dense = bon_curve_parts(proxy, true)
    ragged = bon_curve_parts(list(proxy), list(true))  # validated in full, then the same blocks
    for field in ("true_mean", "true_se", "proxy_mean", "proxy_se", "kl"):
        np.testing.assert_array_equal(getattr(dense.curve, field), getattr(ragged.curve, field))
    np.testing.assert_array_equal(dense.true, ragged.true)


def test_chunked_and_whole_block_ranking_agree_with_ties_and_collisions(rng):
    """One thread ranks a block chunk by chunk, several threads whole: the same values, bit for bit,
    also where packed keys collide (proxies equal in all but their last bits: buckets re-sorted,
    scores gathered again) and across chunk boundaries."""
    from bon_tracker.core.ranking import BLOCK_SAMPLES, CHUNK_SAMPLES

    N = 64
    P = 2 * BLOCK_SAMPLES // N + 37  # three blocks: on two threads no block runs alone
    proxy = rng.normal(size=(P, N))
    proxy[::11, :9] = 0.75  # ties
    near = 1.0 + rng.integers(0, 1 << 20, size=(P // 7, N)) * 2.0**-52  # differ in the low bits only
    proxy[::7][: len(near)] = near
    true = proxy + rng.normal(size=proxy.shape)
    one = bon_curve_parts(proxy, true, threads=1)
    two = bon_curve_parts(proxy, true, threads=2)
    for field in ("true_mean", "true_se", "proxy_mean", "proxy_se", "kl"):
        np.testing.assert_array_equal(getattr(one.curve, field), getattr(two.curve, field))
    np.testing.assert_array_equal(one.true, two.true)
    np.testing.assert_array_equal(one.proxy, two.proxy)
    edge = CHUNK_SAMPLES // N  # first row of the second chunk
    rows = [0, 7, 11, edge - 1, edge, edge + 6, P - 1]
    ns = one.curve.n.tolist()
    np.testing.assert_allclose(one.true[rows], exact_matrix(proxy[rows], true[rows], ns), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one.proxy[rows], exact_matrix(proxy[rows], proxy[rows], ns), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N", [1, 8, 16, 17, 64, 256, 1000])
def test_weight_products_one_row_per_n_are_the_weights(rng, N):
    """apply_by_n, in one product (short rows) or chunk by chunk and transposed: bon_weights applied."""
    from bon_tracker.core.weights import RankWeights, bon_weights

    ns = default_ns(N)
    weights = RankWeights(N, ns)
    stacked = rng.normal(size=(2 * 301 + 1, N))  # not a multiple of any chunk
    want = np.array([bon_weights(N, int(n)) for n in ns]) @ stacked.T
    np.testing.assert_allclose(weights.apply_by_n(stacked), want, rtol=1e-13, atol=1e-13)
    out = np.full((len(ns), stacked.shape[0]), np.nan)
    assert weights.apply_by_n(stacked, out=out) is out
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)


def test_dense_blocks_are_even_and_bounded():
    from bon_tracker.core.ranking import block_rows, dense_blocks

    for P, N in [
        (1, 8),
        (10_000, 8),
        (100_000, 8),
        (10_000, 64),
        (4_097, 64),
        (3, 1 << 20),
        (1000, 4096),
        (3, 1 << 18),
        (9000, 64),
    ]:
        blocks = dense_blocks(P, N)
        assert blocks[0].start == 0 and blocks[-1].stop == P
        assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))
        sizes = [b.stop - b.start for b in blocks]
        fewest = -(-P // block_rows(N))
        assert max(sizes) <= block_rows(N) and len(blocks) == (
            min(P, fewest + 1) if fewest > 1 and fewest % 2 else fewest
        )
        assert len(blocks) == 1 or len(blocks) % 2 == 0 or len(blocks) == P  # two threads share them evenly
        assert max(sizes) - min(sizes) < len(blocks)  # even: the last block short by less than one row a block


def test_kept_product_buffer_across_grids(rng):
    """The product buffer kept with a thread's ranker serves a long grid, then a short one, then a long one."""
    proxy, true = rng.normal(size=(50, 40)), rng.normal(size=(50, 40))
    for ns in (list(range(1, 41)), [1, 40], [1, 2, 3, 5, 8, 13, 21, 34], None):
        parts = bon_curve_parts(proxy, true, ns, threads=1)
        rows = [0, 25, 49]
        np.testing.assert_allclose(
            parts.true[rows], exact_matrix(proxy[rows], true[rows], parts.curve.n), rtol=1e-12, atol=1e-12
        )


def test_single_threaded_blas_sets_and_restores_the_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from bon_tracker.core.threads import single_threaded_blas

    def counts() -> list[int]:
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]

    before = counts()
    with pytest.raises(ZeroDivisionError), single_threaded_blas() as limited:
        assert limited and all(c == 1 for c in counts())
        1 / 0  # noqa: B018
    assert counts() == before
