"""Peer training loops the benchmarks compare chatforge against (written here, no external code)."""
