"""Tracking: the tracker, its write-ahead log and delivery worker, the distributed gather, config."""
