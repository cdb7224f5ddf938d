"""The dispatch/combine benchmark (``python -m jax_ep.bench``, ht mode) at tiny sizes on CPU:
it writes every case, says why a baseline it cannot run here is skipped, keeps going past a
failing case, ends with the jax_ep-vs-rest check, and ``report --plot`` draws the results."""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import pytest

from jax_ep.bench import __main__ as bench_cli
from jax_ep.bench import cases, check, report

TINY = ["--tokens", "16", "--hidden", "128", "--topk", "2", "--experts", "16"]
QUICK = ["--calls", "1", "--repeats", "1", "--copy-bytes", str(1 << 20), "--layouts", "ragged"]
ON_CPU = jax.default_backend() == "cpu"


def _run(tmp_path, *argv) -> dict:
    assert bench_cli.main([*TINY, *QUICK, *argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*_ht_*.json")
    return json.loads(path.read_text())


def _timed(record) -> dict:
    return {(r["op"], r["backend"]): r for r in record["results"] if "median_us" in r}


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU defaults and skip reasons")
@pytest.mark.parametrize("ranks", [8, 1])
def test_ht_bench_on_cpu(tmp_path, capsys, ranks):
    if len(jax.devices()) < ranks:
        pytest.skip(f"needs {ranks} devices")
    record = _run(tmp_path, "--ranks", str(ranks))
    base = {"all_to_all"} | ({"local"} if ranks == 1 else set())
    rows = _timed(record)
    assert set(rows) == {(op, b) for op in ("dispatch", "combine") for b in {"reference"} | base}
    assert all(r["median_us"] > 0 and r["hbm_of_copy"] > 0 for r in rows.values())
    assert record["copy_roofline"]["GBps"] > 0 and record["copy_roofline"]["bytes"] == 1 << 20
    skipped = {s["baseline"]: s["reason"] for s in record["skipped"]}
    assert "XLA:CPU" in skipped["ragged_all_to_all"]
    assert ("local" in skipped) == (ranks != 1)
    # no CUDA backend on CPU: every comparison is n/a, and no losers
    assert record["check"] == dict(jax_ep="n/a", compared=0, losers=[])
    assert all(r["jax_ep_faster"] is None for r in rows.values())
    out = capsys.readouterr().out
    n = 3 if ranks == 1 else 2
    assert f"[{n}/{n}] jax_ep reference backend" in out
    assert "skipped baseline ragged_all_to_all: XLA:CPU" in out and "== losers: none" in out
    text = report.table(record, "x.json")
    assert "Check: n/a" in text and "ragged_all_to_all skipped" in text


def test_failing_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("UNIMPLEMENTED: made up for the test")

    monkeypatch.setitem(cases._BASELINES, "boom", (boom, boom))
    record = _run(tmp_path, "--ranks", "1", "--baselines", "boom,all_to_all")
    (err,) = [r for r in record["results"] if "error" in r]
    assert err["backend"] == "boom" and "UNIMPLEMENTED" in err["error"]
    assert {b for _, b in _timed(record)} == {"all_to_all", "reference"}
    assert "failed: UNIMPLEMENTED" in report.table(record, "x.json")


def test_check_lists_losers_with_their_profile():
    def row(op, backend, us, layout="ragged", fp8=False, **kw):
        return dict(op=op, backend=backend, layout=layout, fp8=fp8, tokens=64, median_us=us, **kw)

    prof = dict(kernels={}, busy_us_per_call=1.0, span_us_per_call=2.0)
    rows = [
        row("dispatch", "local", 5.0),
        row("dispatch", "reference", 20.0),
        row("dispatch", "reference", 30.0, fp8=True),
        row("dispatch", "cuda", 10.0, profile=prof),
        row("dispatch", "cuda", 8.0, fp8=True),  # baselines are BF16: compared with reference
        row("combine", "all_to_all", 50.0),
        row("combine", "cuda", 12.0),
    ]
    assert check.loses(rows[3], rows[:3]) and not check.loses(rows[4], rows[:3])
    result = check.check(rows)
    assert result["jax_ep"] == "cuda" and result["compared"] == 4
    (loser,) = result["losers"]
    assert (loser["rival"], loser["rival_us"], loser["jax_ep_us"]) == ("local", 5.0, 10.0)
    assert loser["profile"] is prof
    assert rows[3]["faster_than"] == {"local": False, "reference": True}
    assert rows[4]["faster_than"] == {"reference": True}
    assert rows[0]["jax_ep_faster"] is False and rows[5]["jax_ep_faster"] is True


def test_defaults_follow_the_platform():
    def args(**kw):
        base = dict(mode="ht", tokens=None, hidden=None, topk=None, experts=None)
        base.update(calls=None, repeats=None, copy_bytes=None, chain=None)
        return argparse.Namespace(**{**base, **kw})

    gpu = bench_cli.sized(args(), "gpu")
    assert (gpu.tokens, gpu.hidden, gpu.topk, gpu.experts) == (4096, 7168, 8, 256)
    assert gpu.copy_bytes == 1 << 30
    cpu = bench_cli.sized(args(tokens=64), "cpu")
    assert (cpu.tokens, cpu.hidden, cpu.topk, cpu.experts) == (64, 256, 4, 32)
    assert bench_cli.sized(args(mode="low-latency"), "gpu").experts == 288
    # ops per program: a decode chain for low-latency, a short one for ht on a GPU
    assert (gpu.chain, cpu.chain) == (4, 1)
    assert bench_cli.sized(args(mode="low-latency"), "cpu").chain == 16
    assert bench_cli.sized(args(chain=2), "gpu").chain == 2


def test_plot(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text(
        json.dumps(
            dict(
                mode="ht",
                device="cpu",
                config=dict(ranks=1),
                results=[
                    dict(op=op, backend=b, layout="ragged", fp8=False, tokens=t, median_us=t * s)
                    for op in ("dispatch", "combine")
                    for b, s in (("reference", 2.0), ("local", 1.0))
                    for t in (16, 64)
                ],
            )
        )
    )
    png = tmp_path / "out" / "p.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert report.main(["--dir", str(tmp_path), "--plot", str(png)]) != 0 and not png.exists()
    monkeypatch.delitem(sys.modules, "matplotlib")
    pytest.importorskip("matplotlib")
    assert report.main(["--dir", str(tmp_path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_chain_runs_every_op_on_arguments_fed_by_the_previous_result(tmp_path):
    seen = []

    def op(x, idx):
        seen.append(idx)
        return idx.sum(), x

    x, idx = jax.numpy.ones(3), jax.numpy.arange(4, dtype=jax.numpy.int32)
    out = jax.jit(cases._chained(op, 3, cases._feed_routing))(x, idx)
    assert len(seen) == 3  # three calls traced, each on the previous call's fed routing
    assert seen[0] is not seen[1] and seen[1] is not seen[2]
    assert int(out[0]) == 6  # the flag is false for real results: the routing is unchanged
    # every leaf goes whole through a barrier and into the flag, NaN included
    nan = jax.numpy.array([jax.numpy.nan, 1.0])
    ((kept, _), _), flag = cases.consumed(((nan, x), idx))
    assert not bool(flag) and kept is not nan  # passed through the barrier
    hlo = jax.jit(lambda v: cases.consumed(v)[1]).lower((nan, x)).as_text()
    assert "optimization_barrier" in hlo
    # jax_ep's custom calls go without it (it cuts XLA's command buffers): XLA runs them whole
    hlo = jax.jit(lambda v: cases.consumed(v, False)[1]).lower((nan, x)).as_text()
    assert "optimization_barrier" not in hlo
    assert [cases.needs_barrier(b) for b in ("cuda", "reference", "local")] == [False, True, True]
    assert cases._chained(op, 1, cases._feed_routing) is op
    assert cases._per_call(dict(median_us=8.0, calls=5), 4) == dict(median_us=2.0, calls=5)
    record = _run(tmp_path, "--chain", "2", "--baselines", "local")
    assert record["config"]["chain"] == 2


def test_low_latency_run_records_its_launch_form(tmp_path):
    argv = ["--mode", "low-latency", "--ranks", "1", "--tokens", "2", "--experts", "8"]
    argv += [
        "--topk",
        "2",
        "--graphs",
        "off",
        "--chain",
        "2",
        "--ll-launches",
        "two",
        "--tag",
        "two",
    ]
    assert bench_cli.main([*QUICK, *argv, "--hidden", "128", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*_low-latency_*two.json")
    record = json.loads(path.read_text())
    assert record["config"]["ll_launches"] == "two"
    assert {r["op"] for r in record["results"]} >= {"ll_dispatch", "ll_combine", "ll_pair"}


def test_a_pure_jax_chain_shares_no_work_between_its_ops():
    """With only the weights fed, XLA computed the local combine's unsort once for a whole
    chain; every operand but the rows fed, each op has its own."""
    import re

    from jax_ep import baselines

    setup = cases.Setup(1, True, 16, 256, 2, 8)
    x, idx, _ = setup.put(*setup.routing(16))
    y, state = setup.per_rank(functools.partial(cases._local_dispatch, num_experts=8))(x, idx)
    w = setup.put(setup.routing(16)[2])[0]

    def scatters(whole):  # (whole=False, one dependence, gave 1 with jax 0.10)
        chain = cases._chained(baselines.local_combine, 4, cases._feed_weights, whole)
        hlo = setup.per_rank(chain).lower(y, w, state).compile().as_text()
        return len(re.findall(r" scatter\(", hlo))

    assert scatters(True) == 4
