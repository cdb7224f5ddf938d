"""``python -m jax_ep.bench.report --plot [PNG]``: time vs tokens per rank, log-log.

One panel per op (dispatch, combine) of the high-throughput runs; one line per implementation
and run setup: jax_ep (the CUDA backend), the reference backend, each baseline. Each line is
the rows a reader compares: the ragged layout in BF16 (the layout the baselines produce).
matplotlib is optional (the ``bench`` extra): without it this says so and fails.
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

OPS = ("dispatch", "combine")
NAMES = {"cuda": "jax_ep (cuda)", "reference": "jax_ep reference backend"}


def series(directory: pathlib.Path) -> dict:
    """``{op: {label: [(tokens, median_us), ...]}}`` from every ht JSON in ``directory``."""
    out = {op: collections.defaultdict(list) for op in OPS}
    for path in sorted(directory.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("mode") != "ht":
            continue
        c = record["config"]
        where = f"{record['device']}, {'loopback ' if c.get('loopback') else 'EP'}{c['ranks']}"
        for r in record["results"]:
            if r.get("op") not in OPS or "median_us" not in r:
                continue
            if r.get("layout") != "ragged" or r.get("fp8"):
                continue
            label = f"{NAMES.get(r['backend'], r['backend'])} [{where}]"
            out[r["op"]][label].append((r["tokens"], r["median_us"]))
    return out


def main(directory: pathlib.Path, png: pathlib.Path) -> int:
    try:
        import matplotlib
    except ImportError:
        print(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or the bench extra: pip install 'jax-ep[bench]')",
            file=sys.stderr,
        )
        return 2
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    data = series(directory)
    if not any(data.values()):
        print(f"no high-throughput results in {directory}", file=sys.stderr)
        return 1
    fig, axes = plt.subplots(1, len(OPS), figsize=(7 * len(OPS), 5), squeeze=False)
    for ax, op in zip(axes[0], OPS, strict=True):
        for label, points in sorted(data[op].items()):
            points.sort()
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="µs (median)")
        ax.set_title(f"{op} (ragged, BF16)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")
    return 0
