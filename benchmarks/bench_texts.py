"""What texts cost: check_texts on the training thread, hack_statistics on the statistics path.

    python benchmarks/bench_texts.py            # 1,000 prompts x 64 completions of 500 characters
    python benchmarks/bench_texts.py --prompts 200 --samples 16 --chars 2000

Prints the best, the median and the worst of ``--repeats`` calls, in ms, measured in this process on one
thread (the goal: check_texts <= 5 ms at 1,000 x 64 x 500 characters), and hack_statistics's cost
with the built-in features, with a regex feature added, and with a 1 MB completion among them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bon_tracker.texts import check_texts, hack_statistics


def completions(P: int, N: int, chars: int, rng: np.random.Generator) -> list[list[str]]:
    """Distinct texts of about ``chars`` characters (words from a small vocabulary)."""
    vocabulary = [f"word{i}" for i in range(200)]
    words = max(chars // 7, 1)
    return [[" ".join(rng.choice(vocabulary, words)) for _ in range(N)] for _ in range(P)]


def timed(fn, repeats: int) -> str:
    """``best / median / worst ms`` of ``repeats`` calls (the machine may be shared: the best is the cost)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return f"best {min(times):.2f} / median {statistics.median(times):.2f} / worst {max(times):.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    P, N = args.prompts, args.samples
    prompts = [f"prompt {i}" for i in range(P)]
    texts_in = completions(P, N, args.chars, rng)
    lengths = [N] * P
    proxy = rng.normal(size=(P, N)) + np.array([[len(t) for t in row] for row in texts_in]) / args.chars
    true = rng.normal(size=(P, N))

    print(f"texts: {P:,} prompts x {N} completions of ~{args.chars} characters; one thread, {os.cpu_count()} CPUs")
    cost = timed(lambda: check_texts(prompts, texts_in, lengths), args.repeats)
    print(f"check_texts (training thread): {cost} (goal <= 5 ms)")

    texts = check_texts(prompts, texts_in, lengths)
    repeats = max(args.repeats // 5, 2)
    cost = timed(lambda: hack_statistics(proxy, true, texts), repeats)
    print(f"hack_statistics, built-in features (statistics path): {cost}")
    cost = timed(lambda: hack_statistics(proxy, true, texts, regex=r"word1\d\b"), repeats)
    print(f"hack_statistics, + a regex feature: {cost}")
    cost = timed(lambda: hack_statistics(proxy, true, texts, features={}), repeats)
    print(f"hack_statistics, no features (the table only): {cost}")

    big = [list(row) for row in texts_in]
    big[0][int(np.argmax(proxy[0]))] = "x " * 500_000  # a 1 MB completion, the pick of prompt 0
    big_texts = check_texts(prompts, big, lengths)
    cost = timed(lambda: hack_statistics(proxy, true, big_texts), repeats)
    size = len(hack_statistics(proxy, true, big_texts).to_json().encode("utf-8"))
    print(f"hack_statistics with a 1 MB completion: {cost}; table JSON {size:,} bytes")


if __name__ == "__main__":
    main()
