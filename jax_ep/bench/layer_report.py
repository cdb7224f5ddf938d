"""README table of a layer benchmark record (``python -m jax_ep.bench --mode layer``)."""

from __future__ import annotations

import copy

from jax_ep.bench.check import check, check_text, layer_comparable

GIB = float(1 << 30)


def _by_pass(rows: list[dict]) -> dict[str, dict]:
    return {r["pass"]: r for r in rows if "pass" in r}


def _cell(runs: dict[str, dict], fmt, key: str) -> str:
    """``fwd / fwd+bwd`` values of ``key`` ('-' where missing)."""
    parts = []
    for p in ("fwd", "fwd+bwd"):
        r = runs.get(p)
        if r is None or key not in r or r[key] is None:
            parts.append("error" if r is not None and "error" in r else "-")
        else:
            parts.append(fmt(r[key]))
    return " / ".join(parts)


def table(record: dict, source: str) -> str:
    c = record["config"]
    factor = c.get("capacity_factor")
    head = (
        f"**{record['device']}**, {record['date'][:10]}, MoE layer, {c['ranks']} rank(s) "
        f"({c['transport']}), bf16, router excluded, capacity factor "
        f"{'worst case' if factor is None else f'{factor:g}'}, baseline {c['baseline']}, "
        f"jax {record['jax']}, commit {record['commit']} — `{source}`; `{c.get('command', '')}`"
    )
    lines = [
        "| target | tokens/rank | expert path | impl | ms fwd / fwd+bwd | expert TFLOP/s "
        "| share outside the experts | peak GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in record["results"]:
        groups.setdefault((r["target"], r["tokens"], r["path"], r["impl"]), []).append(r)
    for (target, tokens, path, impl), rows in groups.items():
        skipped = next((r["skipped"] for r in rows if "skipped" in r), None)
        if skipped:
            lines.append(f"| {target} | {tokens} | {path} | {impl} | skipped: {skipped} |||||")
            continue
        runs = _by_pass(rows)
        lines.append(
            f"| {target} | {tokens} | {path} | {impl} "
            f"| {_cell(runs, lambda v: f'{v / 1e3:.2f}', 'median_us')} "
            f"| {_cell(runs, lambda v: f'{v:.0f}', 'tflops')} "
            f"| {_cell(runs, lambda v: f'{100 * v:.0f}%', 'exchange_share')} "
            f"| {_cell(runs, lambda v: f'{v / GIB:.1f}', 'peak_bytes')} "
            f"| {_cell(runs, lambda v: f'{v:.1f}', 'compile_s')} |"
        )
    note = (
        "Share outside the experts: 1 - (the expert FFN alone on the same rows) / (the layer): "
        "dispatch + combine for jax_ep and reference, sort + gather + unsort + weighted sum for "
        "local. Peak: XLA's memory analysis of the compiled program per device (arguments, "
        "outputs, temporaries)."
    )
    return head + "\n\n" + "\n".join(lines) + "\n\n" + note + check_text(_with_check(record))


def _with_check(record: dict) -> dict:
    """The record with its check; files from before the layer run had one get it computed
    from their own medians (on a copy: the check marks the rows it compares)."""
    if "check" in record:
        return record
    return dict(record, check=check(copy.deepcopy(record["results"]), layer_comparable))
