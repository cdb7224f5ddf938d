"""The check a run ends with: is jax_ep (the CUDA backend) faster than everything else it ran?

Each jax_ep row is compared with the rows of the same run that do the same work: the
reference backend at the same op, tokens, layout and dtype; a baseline (always the ragged
layout in BF16, the layout the baselines hand the experts) at the same op and tokens, against
jax_ep's ragged BF16 row; in a layer run, the baseline's layer at the same target, tokens,
expert path and pass. A jax_ep row slower than any of them is a *loser*: listed at the end
of the run with the profiler's kernel breakdown when one was taken (GPU).
"""

from __future__ import annotations

JAX_EP = "cuda"  # the backend the check is about; without it every comparison is n/a


def comparable(ours: dict, other: dict) -> bool:
    """Do ``ours`` (a jax_ep row) and ``other`` time the same work?"""
    if other["backend"] == JAX_EP or "median_us" not in other:
        return False
    if (other["op"], other["tokens"]) != (ours["op"], ours["tokens"]):
        return False
    if other["backend"] == "reference":
        return (other.get("layout"), other.get("fp8")) == (ours.get("layout"), ours.get("fp8"))
    return ours.get("layout") == "ragged" and not ours.get("fp8")


# The layer benchmark (``--mode layer``): jax_ep's layer against the baseline's layer
# (``impl`` local or reference) at the same target, tokens, expert path and pass.
LAYER_RIVALS = ("local", "reference")


def _layer_key(row: dict) -> tuple:
    return (row.get("target"), row["tokens"], row.get("path"), row.get("pass"))


def layer_comparable(ours: dict, other: dict) -> bool:
    """Do ``ours`` (jax_ep's layer) and ``other`` time the same layer?"""
    return (
        other.get("impl") in LAYER_RIVALS
        and "median_us" in other
        and _layer_key(other) == _layer_key(ours)
    )


def _is_ours(row: dict) -> bool:
    return row.get("backend") == JAX_EP and row.get("impl", "jax_ep") == "jax_ep"


def _case(row: dict) -> str:
    """A row's case as the check's lines name it."""
    if row.get("op") == "layer":
        return f"layer {row.get('target')} {row.get('path')} {row.get('pass')} T={row['tokens']}"
    dtype = "fp8" if row.get("fp8") else "bf16"
    return f"{row['op']} {row.get('layout') or 'll'} {dtype} T={row['tokens']}"


def check(rows: list[dict], same_work=comparable) -> dict:
    """Marks every timed row in place and returns the run's verdict.

    A jax_ep row gets ``faster_than`` ``{rival: bool}``; every other row gets
    ``jax_ep_faster``: ``True``/``False``, or ``None`` (n/a) when no jax_ep row times the
    same work (no CUDA backend here, or another layout). Returns ``jax_ep`` (the backend
    compared, or ``"n/a"``), ``compared`` (pairs compared) and ``losers``: one entry per
    (jax_ep row, faster rival) with the case, both times and the jax_ep row's ``profile``
    if any. ``same_work``: ``comparable`` (dispatch/combine runs) or ``layer_comparable``.
    """
    ours = [r for r in rows if _is_ours(r) and "median_us" in r]
    for r in rows:
        if not _is_ours(r) and "median_us" in r:
            r["jax_ep_faster"] = None
    losers, compared = [], 0
    for mine in ours:
        mine["faster_than"] = {}
        for other in rows:
            if not same_work(mine, other):
                continue
            rival = other["impl"] if same_work is layer_comparable else other["backend"]
            faster = mine["median_us"] < other["median_us"]
            mine["faster_than"][rival] = faster
            other["jax_ep_faster"] = faster
            other["jax_ep_us"] = mine["median_us"]
            compared += 1
            if not faster:
                losers.append(
                    dict(
                        op=mine["op"],
                        case=_case(mine),
                        tokens=mine["tokens"],
                        layout=mine.get("layout"),
                        fp8=mine.get("fp8"),
                        jax_ep_us=mine["median_us"],
                        rival=rival,
                        rival_us=other["median_us"],
                        profile=mine.get("profile") or None,
                    )
                )
    return dict(jax_ep=JAX_EP if ours else "n/a", compared=compared, losers=losers)


def loses(mine: dict, rows: list[dict]) -> bool:
    """Is the jax_ep row ``mine`` slower than a comparable row already in ``rows``?"""
    return any(comparable(mine, o) and o["median_us"] <= mine["median_us"] for o in rows)


def verdict(row: dict) -> str:
    """What a printed row says about jax_ep."""
    if row.get("backend") == JAX_EP:
        vs = row.get("faster_than") or {}
        return ", ".join(f"{'faster' if f else 'SLOWER'} than {b}" for b, f in vs.items())
    f = row.get("jax_ep_faster")
    return "jax_ep n/a" if f is None else ("jax_ep faster" if f else "jax_ep SLOWER")


def print_summary(result: dict, rows: list[dict]) -> None:
    """The end of a run: one line per timed row with the verdict, then the losers."""
    print(f"== check: is jax_ep ({result['jax_ep']}) faster than the rest of this run?")
    for r in rows:
        if "median_us" in r:
            print(
                f"  {r['op']:11s} {r['backend']:18s} {r.get('layout') or '-':9s} "
                f"fp8={int(bool(r.get('fp8')))} T={r['tokens']:<6d} {r['median_us']:10.1f} us"
                f"  {verdict(r)}"
            )
    if result["jax_ep"] == "n/a":
        print("  (no CUDA backend in this run: nothing to compare jax_ep with)")
    print_losers(result)


def print_losers(result: dict) -> None:
    """The losers of a run, each with its profile when one was taken."""
    if not result["losers"]:
        print("== losers: none", flush=True)
        return
    print(f"== losers: {len(result['losers'])} case(s) where jax_ep is not the fastest")
    for lo in result["losers"]:
        print(
            f"  {lo['case']}: jax_ep {lo['jax_ep_us']:.1f} us vs {lo['rival']} "
            f"{lo['rival_us']:.1f} us"
        )
        p = lo.get("profile")
        if p:
            for name, k in p["kernels"].items():
                print(f"    {k['per_call']:5.2f} x {k['median_us']:8.2f} us  {name}")
            print(
                f"    kernels busy {p['busy_us_per_call']:.1f} us of a "
                f"{p['span_us_per_call']:.1f} us span per call"
            )
    print(flush=True)


def check_text(record: dict) -> str:
    """The run's check as the README tables end with it (files from before the check have none)."""
    c = record.get("check")
    if not c:
        return ""
    skipped = "".join(
        f"; {s['baseline']} skipped: {s['reason']}"
        for s in {s["baseline"]: s for s in record.get("skipped", [])}.values()
    )
    if c["jax_ep"] == "n/a":
        return f"\n\nCheck: n/a (no CUDA backend in this run){skipped}."
    if not c["compared"]:  # e.g. the empty ops, timed for the CUDA backend alone
        return f"\n\nCheck: nothing to compare (only jax_ep was timed in this run){skipped}."
    losers = "; ".join(
        f"{lo.get('case') or _case(lo)}: {lo['jax_ep_us']:.1f} µs vs {lo['rival']} "
        f"{lo['rival_us']:.1f} µs"
        for lo in c["losers"]
    )
    return (
        f"\n\nCheck: jax_ep faster in {c['compared'] - len(c['losers'])} of {c['compared']} "
        f"comparisons; losers: {losers or 'none'}{skipped}."
    )
