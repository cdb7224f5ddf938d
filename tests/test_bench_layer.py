"""The layer benchmark (``python -m jax_ep.bench --mode layer``) at tiny sizes on any device:
it runs every variant, writes the JSON the README table is made from, and its derived numbers
(useful TFLOP/s, the share outside the experts) follow from its own timings."""

from __future__ import annotations

import json

import pytest

from jax_ep.bench import __main__ as bench_cli
from jax_ep.bench import report

TINY = ["--tokens", "16", "--experts", "8", "--topk", "2", "--hidden", "128"]


@pytest.mark.parametrize(
    "mode,passes", [(["--ranks", "1"], ("fwd", "fwd+bwd")), (["--loopback", "2"], ("fwd",))]
)
def test_layer_bench_runs_and_reports(tmp_path, mode, passes):
    argv = ["--mode", "layer", *TINY, "--intermediate", "64", "--paths", "einsum"]
    argv += [*mode, "--passes", ",".join(passes), "--budget-s", "0.01", "--compile-workers", "2"]
    argv += ["--out", str(tmp_path)]
    assert bench_cli.main(argv) == 0
    (path,) = tmp_path.glob("*_layer_*.json")
    record = json.loads(path.read_text())
    assert record["mode"] == "layer" and record["config"]["router"] == "excluded"
    baseline = "local" if mode[0] == "--ranks" else "reference"
    rows = {(r["impl"], r["pass"]): r for r in record["results"]}
    assert set(rows) == {(i, p) for i in ("experts", "jax_ep", baseline) for p in passes}
    flops = 6 * 128 * 64 * 16 * 2
    for (impl, p), r in rows.items():
        assert "error" not in r, r
        assert r["median_us"] > 0 and r["runs"] >= 3 and r["compile_s"] > 0
        want = flops * (1 if p == "fwd" else 3) / (r["median_us"] * 1e-6) / 1e12
        assert r["tflops"] == pytest.approx(want)
        if impl != "experts":
            alone = rows[("experts", p)]["median_us"]
            assert r["exchange_share"] == pytest.approx(max(0.0, 1 - alone / r["median_us"]))
    text = report.table(record, path.name)
    assert "| custom | 16 | einsum | jax_ep |" in text


def test_layer_check_compares_each_layer_with_the_baseline():
    """jax_ep's layer (CUDA backend) against the baseline's at the same target, tokens, path
    and pass; the experts-alone rows are no rival; a slower case is a loser in the JSON's
    check and in the README table, also for a file written before the layer run had a check."""
    from jax_ep.bench import check, layer_report

    def row(impl, backend, us, tokens=512, p="fwd"):
        return dict(
            op="layer",
            target="t",
            tokens=tokens,
            path="einsum",
            impl=impl,
            backend=backend,
            median_us=us,
            **{"pass": p},
        )

    rows = [
        row("experts", "-", 1.0),
        row("jax_ep", "cuda", 15.0),
        row("local", "-", 14.0),
        row("jax_ep", "cuda", 10.0, tokens=4096),
        row("local", "-", 12.0, tokens=4096),
    ]
    result = check.check(rows, check.layer_comparable)
    assert result["compared"] == 2
    (loser,) = result["losers"]
    assert loser["case"] == "layer t einsum fwd T=512" and loser["rival"] == "local"
    assert rows[3]["faster_than"] == {"local": True} and rows[0]["jax_ep_faster"] is None
    record = dict(
        device="GPU",
        date="2026-12-03",
        jax="0.11.2",
        commit="c",
        results=[
            {k: v for k, v in r.items() if k not in ("faster_than", "jax_ep_faster", "jax_ep_us")}
            for r in rows
        ],
        config=dict(ranks=1, transport="none", capacity_factor=2.0, baseline="local"),
    )
    text = layer_report.table(record, "x.json")
    assert "Check: jax_ep faster in 1 of 2 comparisons; losers: layer t einsum fwd T=512" in text
