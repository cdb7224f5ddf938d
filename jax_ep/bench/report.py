"""Regenerates README.md's benchmark tables from the JSON files under ``benchmarks/``.

python -m jax_ep.bench.report              # print the tables
python -m jax_ep.bench.report --readme     # rewrite README.md between its bench markers
python -m jax_ep.bench.report --plot       # time vs tokens per rank -> benchmarks/plot.png

Files written before a field existed (the check, the copy roofline's details, the per-row
cost of ``ragged_all_to_all``, per-case errors) are read as they are: what they lack is left
out of the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from jax_ep.bench.check import check_text

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _fmt_row(r: dict) -> str:
    layout = r.get("layout", "ll")
    dtype = "fp8" if r.get("fp8") else "bf16"
    if "error" in r:  # a case that failed: the run recorded why and went on
        return f"| {r['op']} | {r['backend']} | - | - | {r['tokens']} | failed: {r['error']} |"
    if "hidden_us" in r:  # send / matmul / receive overlap
        return (
            f"| {r['op']} | {r['backend']} | {layout} | {dtype} | {r['tokens']} | "
            f"{r['overlapped_us']:.1f} | send+recv {r['split_us']:.1f} µs + matmul "
            f"{r['matmul_us']:.1f} µs: {r['hidden_us']:.1f} µs hidden | - | - |"
        )
    gbps = [f"{r[k]:.0f}" if r.get(k) else "-" for k in ("link_GBps", "net_GBps", "hbm_GBps")]
    us = f"{r['median_us']:.1f}"
    if "us_per_row" in r:  # XLA's own cost per row moved (ragged_all_to_all)
        us += f" ({r['us_per_row']:.2f} µs per row)"
    return (
        f"| {r['op']} | {r['backend']} | {layout} | {dtype} | "
        f"{r['tokens']} | {us} | " + " | ".join(gbps) + " |"
    )


def table(record: dict, source: str) -> str:
    if record["mode"] == "layer":
        from jax_ep.bench import layer_report

        return layer_report.table(record, source)
    c = record["config"]
    head = (
        f"**{record['device']}**, {record['date'][:10]}, {c['ranks']} rank(s) "
        f"({c['transport']}), hidden {c['hidden']}, top-{c['topk']} of {c['experts']} "
        f"experts, jax {record['jax']}, commit {record['commit']} — `{source}`"
    )
    if c.get("processes", 1) > 1:
        head += f"; {c['processes']} processes (jax_ep.launch)"
    if record.get("copy_bandwidth_GBps"):
        head += f"; plain copy in the same run: {record['copy_bandwidth_GBps']:.0f} GB/s"
    if record["mode"] == "low-latency":
        head += f"; command buffers {c.get('graphs', '?')}, {c.get('chain')} ops per program"
        if c.get("ll_launches") == "two":
            head += "; one-call ops as two launches (--ll-launches two)"
    elif c.get("chain", 1) > 1:
        head += f"; {c['chain']} dependent ops per program (time per op)"
    rows = [
        "| op | backend | layout | dtype | tokens/rank | µs (median) | NVLink GB/s "
        "| NVSHMEM GB/s | HBM GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows += [_fmt_row(r) for r in record["results"]]
    return head + "\n\n" + "\n".join(rows) + check_text(record)


def render(directory: pathlib.Path) -> str:
    parts = []
    for path in sorted(directory.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("platform") != "gpu":
            continue
        parts.append(table(record, f"benchmarks/{path.name}"))
    return "\n\n".join(parts) if parts else "_No GPU benchmark recorded yet._"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_ep.bench.report")
    p.add_argument("--dir", default="benchmarks")
    p.add_argument("--readme", action="store_true", help="rewrite README.md in place")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="draw time vs tokens per rank into PNG (default: <dir>/plot.png); needs matplotlib",
    )
    args = p.parse_args(argv)
    if args.plot is not None:
        from jax_ep.bench import plot

        directory = pathlib.Path(args.dir)
        return plot.main(directory, pathlib.Path(args.plot or directory / "plot.png"))
    text = render(pathlib.Path(args.dir))
    if not args.readme:
        print(text)
        return 0
    readme = pathlib.Path("README.md")
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
