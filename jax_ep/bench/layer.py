"""``python -m jax_ep.bench --mode layer``: one MoE layer at DeepSeek-V3 sizes, jax_ep against
what a JAX user would otherwise write, with every expert path, forward and forward+backward.

    python -m jax_ep.bench --mode layer            # both targets, 512/4096/8192 tokens, EP=1
    python -m jax_ep.bench --mode layer --targets all-experts --tokens 4096 --paths einsum,mosaic
    python -m jax_ep.bench --mode layer --loopback 2 --targets ep8-share  # vs the reference
    python -m jax_ep.bench --mode layer --tokens 16 --experts 8 --topk 2 --hidden 128 \\
        --intermediate 64                          # tiny sizes (runs on CPU)

The layer is dispatch → SwiGLU experts → weighted combine; the router is excluded (top-k ids
and weights are inputs, uniform random over the experts, generated on the device with
jax.random), the backward differentiates the tokens, the router weights and the expert weights
and returns their gradients. Targets (``--targets``): ``ep8-share`` (one EP8 rank's share of
DeepSeek-V3 run at EP=1: 32 experts, top-8, hidden 7168, FFN 2048) and ``all-experts`` (all
256 experts on one GPU). For each target, tokens per rank and expert path (``--paths``: every
path of :mod:`jax_ep.experts` that can run here) and each pass:

* ``jax_ep``: :func:`jax_ep.dispatch` (the path's layout, ``--capacity-factor``), the experts,
  :func:`jax_ep.combine`, on the group's backend (CUDA kernels when built);
* the path a JAX user would otherwise write at that EP size, in the same run: ``local`` at
  EP=1 (MaxText without EP: sort, gather, grouped GEMM, unsort, weighted sum), ``reference``
  (jax_ep's pure-JAX backend) with loopback ranks;
* ``experts``: the expert FFN alone on the rows dispatch produced; the jax_ep row's
  ``exchange_share`` is ``1 - experts / jax_ep``: the share of the step spent in dispatch and
  combine (with their glue).

Each case reports the median of many steady-state runs (``--budget-s`` of runs, at least 3),
the first call's compile time and first-run time apart, useful TFLOP/s of the expert GEMMs
(``6 * T * K * D * F`` per forward, 3x that with the backward), and the peak memory of the
compiled program per device (arguments + outputs + temporaries, XLA's memory analysis).
``ragged_dot`` on a GPU is skipped where XLA's dense expansion would exceed ``--max-dense-gib``.
Writes ``benchmarks/<date>_<device>_layer_<ep|lb><R>.json`` (the format of the other modes);
``python -m jax_ep.bench.report --readme`` renders it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import pathlib
import sys
import time

RANKS_HELP = "EP ranks over real devices (default 1: the targets are per-rank shares)"


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m jax_ep.bench --mode layer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=["layer"], default="layer")
    p.add_argument("--targets", default="ep8-share,all-experts", help="comma list of targets")
    p.add_argument("--tokens", default="512,4096,8192", help="comma list of tokens per rank")
    for name in ("experts", "topk", "hidden", "intermediate"):
        p.add_argument(f"--{name}", type=int, default=None, help="custom target (all four)")
    p.add_argument("--paths", default="auto", help="expert paths, comma list; auto: all that run")
    p.add_argument("--ranks", type=int, default=1, help=RANKS_HELP)
    p.add_argument("--loopback", type=int, default=None, help="virtual ranks on one device")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "reference"])
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma list: fwd, fwd+bwd")
    p.add_argument(
        "--capacity-factor",
        default="2",
        help="dispatch capacity over the balanced load ('none': the worst case)",
    )
    p.add_argument("--budget-s", type=float, default=0.4, help="timed seconds per case")
    p.add_argument("--max-runs", type=int, default=50)
    p.add_argument(
        "--max-dense-gib",
        type=float,
        default=4.0,
        help="GPU: skip ragged_dot where XLA's dense expansion would exceed this",
    )
    p.add_argument(
        "--compile-workers",
        type=int,
        default=4,
        help="programs of one token count compiled in parallel (timing stays serial)",
    )
    p.add_argument("--out", default="benchmarks", help="directory of the JSON result")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    return p.parse_args(argv)


def _shapes(args):
    from jax_ep.bench.layer_fns import TARGETS, Shape

    custom = [args.experts, args.topk, args.hidden, args.intermediate]
    if any(v is not None for v in custom):
        base = TARGETS["ep8-share"]
        e, k, d, f = (
            v if v is not None else getattr(base, n)
            for v, n in zip(custom, ("experts", "topk", "hidden", "intermediate"), strict=True)
        )
        return [Shape("custom", e, k, d, f)]
    unknown = [t for t in args.targets.split(",") if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; known: {sorted(TARGETS)}")
    return [TARGETS[t] for t in args.targets.split(",") if t]


def _paths(args, shape, dtype):
    from jax_ep import experts

    wanted = experts.PATHS if args.paths == "auto" else tuple(args.paths.split(","))
    out = []
    for path in wanted:
        why = experts.unsupported(
            path, dtype=dtype, hidden=shape.hidden, intermediate=shape.intermediate
        )
        if why and args.paths != "auto":
            print(f"  {path}: cannot run here: {why}", flush=True)
        if not why:
            out.append(path)
    return out


def _dense_expansion_gib(shape, num_ranks: int, rows: int) -> float:
    """What XLA:GPU's dense expansion of ``ragged_dot`` materialises: ``[E_loc, rows, D]``."""
    return shape.experts // num_ranks * rows * max(shape.hidden, shape.intermediate) * 2 / 2**30


def _error_text(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        text = "out of memory: " + text
    return f"{type(e).__name__}: {text[:300]}"


def _peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every platform reports it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def compile_case(fn, args: tuple):
    """``(compiled, compile_s)``: lowering + compilation (autotuning included)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_case(compiled, args: tuple, *, budget_s: float, max_runs: int) -> dict:
    """Run a compiled program once (``first_run_s``), then time its steady state: the median
    (and p10/p90) in µs over ``runs`` runs, as many as fit in ``budget_s`` (3 to ``max_runs``),
    and ``peak_bytes``."""
    import jax

    from jax_ep.bench.timing import measure

    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first_run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    estimate = time.perf_counter() - t0
    runs = max(3, min(max_runs, int(budget_s / max(estimate, 1e-6))))
    res = measure(lambda: compiled(*args), calls=1, repeats=runs, warmup=0)
    return dict(
        median_us=res["median_us"],
        p10_us=res["p10_us"],
        p90_us=res["p90_us"],
        runs=runs,
        first_run_s=first_run_s,
        peak_bytes=_peak_bytes(compiled),
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    import jax
    import jax.numpy as jnp

    import jax_ep
    from jax_ep.bench import check, timing
    from jax_ep.bench import layer_fns as fns
    from jax_ep.bench.cases import Setup

    env = timing.environment()
    loopback = args.loopback is not None
    ranks = args.loopback if loopback else args.ranks
    backend = jax_ep.default_backend() if args.backend == "auto" else args.backend
    factor = None if args.capacity_factor.lower() == "none" else float(args.capacity_factor)
    shapes = _shapes(args)
    run = _Run(
        args=args,
        backend=backend,
        baseline="reference" if loopback or ranks > 1 else "local",
        factor=factor,
        passes=[p for p in args.passes.split(",") if p],
        on_gpu=jax.devices()[0].platform == "gpu",
        dtype=jnp.bfloat16,
    )
    token_counts = [int(t) for t in args.tokens.split(",") if t]
    print(
        f"jax_ep.bench layer: {ranks} rank(s) ({'loopback' if loopback else 'devices'}) on "
        f"{env['device']}, jax_ep backend {backend}, baseline {run.baseline}, bf16, capacity "
        f"factor {factor}, router excluded",
        flush=True,
    )
    record = dict(
        env,
        mode="layer",
        config=dict(
            ranks=ranks,
            loopback=loopback,
            transport=Setup(ranks, loopback, 1, 1, 1, ranks).transport,
            tokens=token_counts,
            targets=[dict(vars(s)) for s in shapes],
            topk=shapes[0].topk,
            hidden=shapes[0].hidden,
            experts=shapes[0].experts,
            backend=backend,
            baseline=run.baseline,
            dtype="bfloat16",
            capacity_factor=factor,
            passes=run.passes,
            router="excluded",
            budget_s=args.budget_s,
            compile_workers=args.compile_workers,
            command="python -m jax_ep.bench " + " ".join(argv),
        ),
        results=[],
    )
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = env["device"].replace(" ", "-")
    name = f"{env['date'][:10]}_{device}_layer_{'lb' if loopback else 'ep'}{ranks}"
    path = out_dir / f"{name}{'_' + args.tag if args.tag else ''}.json"
    t_start = time.perf_counter()
    for shape in shapes:
        setup = Setup(ranks, loopback, max(token_counts), shape.hidden, shape.topk, shape.experts)
        paths = _paths(args, shape, run.dtype)
        print(f"== {shape}: paths {paths}", flush=True)
        weights = fns.expert_weights(setup, shape, seed=10, dtype=run.dtype)
        for tokens in token_counts:
            record["results"] += run.tokens(setup, shape, tokens, paths, weights)
            record["check"] = check.check(record["results"], check.layer_comparable)
            # written after every block: a run cut short still leaves its results
            path.write_text(json.dumps(record, indent=1))
            print(f"   ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
        del weights
        gc.collect()
    record["check"] = result = check.check(record["results"], check.layer_comparable)
    path.write_text(json.dumps(record, indent=1))
    print(
        f"== check: is jax_ep's layer ({result['jax_ep']}) faster than the {run.baseline} "
        f"layer? {result['compared'] - len(result['losers'])} of {result['compared']} cases"
    )
    check.print_losers(result)
    print(f"wrote {path}", flush=True)
    return 0


@dataclasses.dataclass
class _Run:
    """What every case of one run shares (options, backend, baseline)."""

    args: argparse.Namespace
    backend: str
    baseline: str
    factor: float | None
    passes: list[str]
    on_gpu: bool
    dtype: object

    def tokens(self, setup, shape, tokens: int, paths: list[str], weights) -> list[dict]:
        """Every case at one token count: build, compile (in parallel), then time one by one."""
        from jax_ep.bench import layer_fns as fns

        x, idx, w, ct = fns.routing_and_tokens(setup, shape, tokens, seed=tokens, dtype=self.dtype)
        group = setup.group(self.backend)
        ref_group = setup.group("reference") if self.baseline == "reference" else None
        cases, out = [], []
        for path in paths:
            common = self._common(setup, shape, tokens, path)
            skip = self._skip(setup, shape, path, common["rows"])
            if skip:
                print(f"  {shape.name} T={tokens} {path}: skipped ({skip})", flush=True)
                out.append(dict(common, impl="jax_ep", backend=self.backend, skipped=skip))
                continue
            cases += self._cases(
                setup, shape, path, common, group, ref_group, (x, idx, w, ct), weights
            )
        # compile everything first (XLA compiles in parallel threads), then time with the host
        # idle: a compile beside a timed run would steal the CPU that launches its kernels
        with concurrent.futures.ThreadPoolExecutor(self.args.compile_workers) as pool:
            compiled = list(pool.map(_try_compile, cases))
        for case, result in zip(cases, compiled, strict=True):
            out.append(self._time(case, *result, shape, tokens, out))
        del compiled
        for g in (group, ref_group):
            if g is not None:
                g.close()
        return out

    def _common(self, setup, shape, tokens, path) -> dict:
        from jax_ep import experts
        from jax_ep.capacity import dispatch_capacity

        layout = experts.LAYOUTS[path]
        capacity = dispatch_capacity(
            layout,
            num_ranks=setup.num_ranks,
            num_tokens=tokens,
            num_topk=shape.topk,
            num_experts=shape.experts,
            capacity_factor=self.factor,
        )
        rows = capacity * (shape.experts // setup.num_ranks if layout == "expert_major" else 1)
        return dict(
            op="layer",
            target=shape.name,
            experts=shape.experts,
            topk=shape.topk,
            hidden=shape.hidden,
            intermediate=shape.intermediate,
            tokens=tokens,
            path=path,
            layout=layout,
            rows=rows,
            fp8=False,
            capacity_factor=self.factor,
        )

    def _skip(self, setup, shape, path, rows) -> str:
        dense = _dense_expansion_gib(shape, setup.num_ranks, rows)
        if self.on_gpu and path == "ragged_dot" and dense > self.args.max_dense_gib:
            return (
                f"XLA:GPU expands ragged_dot densely: about {dense:.0f} GiB "
                f"(> --max-dense-gib {self.args.max_dense_gib:g})"
            )
        return ""

    def _cases(self, setup, shape, path, common, group, ref_group, data, weights) -> list[dict]:
        """The programs of one path: the experts alone, jax_ep's layer, the baseline's."""
        from jax_ep.bench import layer_fns as fns

        x, idx, w, ct = data
        layers = [("jax_ep", self.backend, fns.jax_ep_layer(group, path, self.factor, self.dtype))]
        if self.baseline == "local":
            layer = fns.local_layer(shape.experts, path, self.factor, self.dtype)
            layers.append(("local", "-", layer))
        else:
            layer = fns.jax_ep_layer(ref_group, path, self.factor, self.dtype)
            layers.append(("reference", "reference", layer))
        specs = [(n, b, f, (x, idx, w, *weights), ct, (0, 2, 3, 4, 5)) for n, b, f in layers]
        try:  # the rows jax_ep's dispatch hands the experts, for the experts-only programs
            rows, counts = setup.per_rank(fns.dispatched_rows(group, path, self.factor))(x, idx, w)
            rows_ct = fns.cotangent_like(setup, rows, seed=7)
            experts = fns.experts_only(path, self.dtype)
            specs.insert(
                0, ("experts", "-", experts, (rows, counts, *weights), rows_ct, (0, 2, 3, 4))
            )
        except Exception as e:  # noqa: BLE001  (reported; the other programs still run)
            print(f"  dispatch for {path} failed: {_error_text(e)}", flush=True)
        cases = []
        for name, backend, layer, inputs, cot, diff in specs:
            for p in self.passes:
                fn = setup.per_rank(layer if p == "fwd" else fns.with_backward(layer, diff))
                row = dict(common, impl=name, backend=backend, **{"pass": p})
                cases.append(dict(row=row, fn=fn, args=inputs if p == "fwd" else (*inputs, cot)))
        return cases

    def _time(self, case, compiled, compile_s, error, shape, tokens, done) -> dict:
        row = dict(case["row"], compile_s=compile_s)
        label = f"  {shape.name} T={tokens} {row['path']:10s} {row['impl']:9s} {row['pass']:7s}"
        if error is None:
            try:
                row.update(
                    time_case(
                        compiled,
                        case["args"],
                        budget_s=self.args.budget_s,
                        max_runs=self.args.max_runs,
                    )
                )
            except Exception as e:  # noqa: BLE001
                error = _error_text(e)
        if error is not None:
            row["error"] = error
            print(f"{label} {error}", flush=True)
            return row
        flops = shape.expert_flops(tokens) * (1 if row["pass"] == "fwd" else 3)
        row["tflops"] = flops / (row["median_us"] * 1e-6) / 1e12
        alone = next(
            (
                r
                for r in done
                if r.get("impl") == "experts"
                and r["path"] == row["path"]
                and r["pass"] == row["pass"]
                and "median_us" in r
            ),
            None,
        )
        if row["impl"] != "experts" and alone is not None:
            row["exchange_share"] = max(0.0, 1.0 - alone["median_us"] / row["median_us"])
        share = f", exchange {100 * row['exchange_share']:.0f}%" if "exchange_share" in row else ""
        peak = f", peak {row['peak_bytes'] / 2**30:.1f} GiB" if row["peak_bytes"] else ""
        print(
            f"{label} {row['median_us'] / 1e3:9.2f} ms {row['tflops']:6.1f} TFLOP/s{share}{peak}"
            f" (compile {compile_s:.1f} s, first run {row['first_run_s'] * 1e3:.0f} ms)",
            flush=True,
        )
        return row


def _try_compile(case):
    """``(compiled, compile_s, error)`` of one case (errors are results, not crashes)."""
    t0 = time.perf_counter()
    try:
        compiled, compile_s = compile_case(case["fn"], case["args"])
    except Exception as e:  # noqa: BLE001
        return None, time.perf_counter() - t0, _error_text(e)
    return compiled, compile_s, None
