"""Multi-process runs: gather every rank's scores to rank 0.

torch is only looked at if the program already imported it, so bon_tracker never
imports torch itself.
"""

from __future__ import annotations

import sys
from typing import Any


def _dist():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in a single process)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
