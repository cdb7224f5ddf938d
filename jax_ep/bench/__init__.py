"""``python -m jax_ep.bench``: timings of jax_ep's ops and of what users would run instead.

Every run writes one JSON file under ``benchmarks/`` (device, versions, commit,
config, per-case median/p10/p90 in microseconds, bytes that cross the link and
bytes through local memory, SMs used) and prints a table. See ``--help``.
"""
