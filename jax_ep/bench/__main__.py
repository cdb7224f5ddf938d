"""CLI: ``python -m jax_ep.bench [--mode ht|low-latency|layer] ...`` (``--help`` lists the options).

Sizes default to the platform: DeepSeek-V3 (4096 tokens/rank, hidden 7168, top-8 of 256)
on a GPU, small shapes on CPU (128 tokens/rank, hidden 256, top-4 of 32, few repeats).
Each case's rows go to the JSON as soon as it finishes; the run ends with a check: is
jax_ep (the CUDA backend) faster than the reference backend and each baseline, and where the
time went in the cases where it is not (the losers, profiled on a GPU).

Examples::

    python -m jax_ep.bench                              # every local GPU as one EP group
    python -m jax_ep.bench --loopback 2                 # 2 virtual ranks on one GPU
    python -m jax_ep.bench --ranks 1 --layouts ragged   # EP=1: the kernels' own efficiency
    python -m jax_ep.bench --mode low-latency --tokens 128 --experts 288
    python -m jax_ep.bench --sweep 128,512,2048,8192    # time vs tokens per rank
    # internode path, one process per GPU, the GPUs split into 2 virtual nodes:
    python -m jax_ep.launch -n 8 -m jax_ep.bench --transport nvshmem --node-size 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time


def _parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jax_ep.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--mode",
        choices=["ht", "low-latency", "layer"],
        default="ht",
        help="layer: one MoE layer (--mode layer --help lists its options)",
    )
    # sizes default to the platform (see DEFAULTS): DeepSeek-V3 on a GPU, small on CPU
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per rank (GPU: ht 4096, ll 128)"
    )
    p.add_argument("--hidden", type=int, default=None, help="GPU: 7168")
    p.add_argument("--topk", type=int, default=None, help="GPU: 8")
    p.add_argument("--experts", type=int, default=None, help="GPU: ht 256, ll 288")
    p.add_argument("--ranks", type=int, default=None, help="EP ranks (default: all GPUs)")
    p.add_argument("--loopback", type=int, default=None, help="virtual ranks on one GPU")
    p.add_argument("--layouts", default="ragged,per_rank", help="comma list (ht)")
    p.add_argument("--backends", default="cuda,reference", help="jax_ep backends to time")
    p.add_argument(
        "--baselines",
        default="local,ragged_all_to_all,all_to_all",
        help="comma list of baselines, or 'none' (local: EP=1 only; ragged_all_to_all: not on "
        "CPU nor in loopback; a baseline that cannot run is skipped with the reason)",
    )
    p.add_argument("--sweep", default="", help="comma list of token counts (ht)")
    p.add_argument("--num-sms", type=int, default=0, help="SMs of the send kernels (0: default)")
    p.add_argument(
        "--num-copy-sms", type=int, default=0, help="SMs of the copy kernels (0: all SMs)"
    )
    p.add_argument(
        "--ll-launches",
        choices=["one", "two"],
        default="one",
        help="low-latency: the one-call ops as one launch where the group allows it (the "
        "default, Config.low_latency_one_launch) or always the split forms' two launches",
    )
    p.add_argument(
        "--transport",
        choices=["ipc", "nvshmem"],
        default="ipc",
        help="how processes reach each other's buffers (one process per GPU, jax_ep.launch)",
    )
    p.add_argument(
        "--node-size",
        type=int,
        default=0,
        help="nvshmem: ranks per node (0: per host); smaller splits a host into virtual nodes",
    )
    p.add_argument("--calls", type=int, default=None, help="calls per repeat (GPU: 20)")
    p.add_argument("--repeats", type=int, default=None, help="GPU: 15")
    p.add_argument(
        "--copy-bytes",
        type=int,
        default=None,
        help="array of the copy roofline (GPU: 1 GiB, CPU: 16 MiB)",
    )
    p.add_argument(
        "--chain",
        type=int,
        default=None,
        help="dependent ops per program, the time divided by it (GPU: ll 16, ht 4; CPU: "
        "ll 16, ht 1): a model step runs the op inside a larger program, so the host's "
        "per-call dispatch is not the op's cost",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="add a kernel breakdown from the JAX profiler to each CUDA result (GPU)",
    )
    p.add_argument("--no-fp8", action="store_true", help="low-latency: BF16 dispatch")
    p.add_argument(
        "--graphs",
        choices=["both", "on", "off"],
        default="both",
        help="low-latency: XLA command buffers (CUDA graphs) on, off, or both",
    )
    p.add_argument("--out", default="benchmarks", help="directory of the JSON result")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    return p.parse_args(argv)


# Defaults per platform: DeepSeek-V3's shapes where the kernels run (a GPU); elsewhere (CPU:
# the reference backend and baselines only) shapes that finish in about a minute on 2 cores.
DEFAULTS = {
    "gpu": dict(
        tokens=4096,
        ll_tokens=128,
        hidden=7168,
        topk=8,
        experts=256,
        ll_experts=288,
        calls=20,
        repeats=15,
        copy_bytes=1 << 30,
        ll_chain=16,
        chain=4,
    ),
    "cpu": dict(
        tokens=128,
        ll_tokens=32,
        hidden=256,
        topk=4,
        experts=32,
        ll_experts=32,
        calls=3,
        repeats=3,
        copy_bytes=16 << 20,
        ll_chain=16,
        chain=1,
    ),
}


def sized(args, platform: str):
    """``args`` with every size the user left out taken from :data:`DEFAULTS`."""
    d = DEFAULTS.get(platform, DEFAULTS["cpu"])
    ll = args.mode == "low-latency"
    for name in ("hidden", "topk", "calls", "repeats", "copy_bytes"):
        if getattr(args, name) is None:
            setattr(args, name, d[name])
    if args.tokens is None:
        args.tokens = d["ll_tokens" if ll else "tokens"]
    if args.experts is None:
        args.experts = d["ll_experts" if ll else "experts"]
    if args.chain is None:
        args.chain = d["ll_chain" if ll else "chain"]
    return args


def _no_graph_flags() -> str:
    return (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode")
    if mode.parse_known_args(argv)[0].mode == "layer":  # its own options: jax_ep/bench/layer.py
        from jax_ep.bench import layer

        return layer.main(argv)
    args = _parse(argv)
    if args.mode == "low-latency" and args.graphs == "both":
        # command buffers are an XLA flag fixed at start-up: run each setting in its own process
        results = []
        for setting in ("on", "off"):
            env = dict(os.environ)
            if setting == "off":
                env["XLA_FLAGS"] = _no_graph_flags()
            argv2 = [a for a in (argv if argv is not None else sys.argv[1:])]
            cmd = [
                sys.executable,
                "-m",
                "jax_ep.bench",
                *argv2,
                "--graphs",
                setting,
                "--tag",
                f"{args.tag}graphs-{setting}",
            ]
            print(f"== {' '.join(cmd[3:])}", flush=True)
            if subprocess.call(cmd, env=env):
                return 1
            results.append(setting)
        return 0
    return _run(args)


def _run(args) -> int:
    from jax_ep import launch

    if launch.ENV_COORDINATOR in os.environ:  # one process per GPU, started by jax_ep.launch
        launch.initialize()
    import jax

    import jax_ep

    if jax.process_index() != 0:  # process 0 reports for the job
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    from jax_ep.bench import cases, check, timing

    env = timing.environment()
    args = sized(args, env["platform"])
    ll = args.mode == "low-latency"
    tokens, experts = args.tokens, args.experts
    loopback = args.loopback is not None
    ranks = args.loopback if loopback else (args.ranks or len(jax.devices()))
    config = jax_ep.Config(
        num_sms=args.num_sms,
        num_copy_sms=args.num_copy_sms,
        low_latency_one_launch=args.ll_launches == "one",
        transport=args.transport,
        node_size=args.node_size,
    )
    backends = [b for b in args.backends.split(",") if b]
    if jax_ep.default_backend() != "cuda" and "cuda" in backends:
        print(
            f"note: CUDA backend unavailable here ({env['platform']}); timing the reference "
            "backend and baselines only (the check says n/a)",
            flush=True,
        )
        backends = [b for b in backends if b != "cuda"]
    base = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
    setup = cases.Setup(
        ranks, loopback, tokens, args.hidden, args.topk, experts, node_size=args.node_size or ranks
    )
    print(
        f"jax_ep.bench {args.mode}: {ranks} rank(s) ({setup.transport}) on {env['device']}, "
        f"{tokens} tokens/rank, hidden {args.hidden}, top-{args.topk} of {experts}",
        flush=True,
    )
    record = dict(
        env,
        mode=args.mode,
        config=dict(
            ranks=ranks,
            loopback=loopback,
            transport=setup.transport,
            tokens=tokens,
            hidden=args.hidden,
            topk=args.topk,
            experts=experts,
            num_sms=args.num_sms or None,
            num_copy_sms=args.num_copy_sms or None,
            processes=jax.process_count(),
            transport_option=args.transport,
            node_size=args.node_size or None,
            calls=args.calls,
            repeats=args.repeats,
            chain=args.chain,
        ),
        results=[],
    )
    path = _json_path(args, env, ranks, loopback, setup.node_size)
    write = (lambda: None) if jax.process_index() != 0 else (lambda: _write(path, record))
    if ll:
        record["config"].update(
            graphs=args.graphs, fp8=not args.no_fp8, ll_launches=args.ll_launches
        )
        record["results"] = cases.ll_cases(
            setup,
            backends=backends,
            chain=args.chain,
            calls=args.calls,
            repeats=args.repeats,
            fp8=not args.no_fp8,
            config=config,
            profile=args.profile,
        )
        record["check"] = check.check(record["results"])
        check.print_summary(record["check"], record["results"])
    else:
        roof = timing.copy_roofline(
            jax.devices()[0], args.copy_bytes, calls=args.calls, repeats=args.repeats
        )
        record["copy_roofline"] = roof
        record["copy_bandwidth_GBps"] = roof["GBps"]
        print(
            f"  copy roofline (read+write of a {roof['bytes'] / 2**20:.0f} MiB array): "
            f"{roof['GBps']:.0f} GB/s",
            flush=True,
        )
        plan, skipped = [], []
        for t in [int(v) for v in args.sweep.split(",")] if args.sweep else [tokens]:
            c, s = cases.ht_plan(
                dataclasses.replace(setup, tokens=t),
                layouts=args.layouts.split(","),
                backends=backends,
                baselines_wanted=base,
                calls=args.calls,
                repeats=args.repeats,
                config=config,
                profile=args.profile,
                chain=args.chain,
            )
            plan += c
            skipped += s
        record["skipped"] = skipped
        for name, why in dict.fromkeys((s["baseline"], s["reason"]) for s in skipped):
            print(f"  skipped baseline {name}: {why}", flush=True)
        _run_cases(plan, record, roof["GBps"], write)
        record["check"] = check.check(record["results"])
        check.print_summary(record["check"], record["results"])
    write()
    if jax.process_index() == 0:
        print(f"wrote {path}", flush=True)
    return 0


def _run_cases(plan, record: dict, copy_gbps: float, write) -> None:
    """Runs every case in order, printing progress; a case that fails is recorded with its
    error and the run goes on; the JSON is rewritten after every case."""
    t0 = time.perf_counter()
    for i, case in enumerate(plan, 1):
        print(
            f"-- [{i}/{len(plan)}] {case.label}, {case.tokens} tokens/rank "
            f"({time.perf_counter() - t0:.0f} s elapsed)",
            flush=True,
        )
        rows = []
        try:
            case.run(list(record["results"]), rows)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
            text = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            print(f"  failed: {type(e).__name__}: {text}", flush=True)
            rows.append(dict(op="-", backend=case.backend, tokens=case.tokens, error=text))
        for r in rows:
            if r.get("hbm_GBps") and copy_gbps:
                r["hbm_of_copy"] = r["hbm_GBps"] / copy_gbps  # share of the copy roofline
        record["results"] += rows
        write()
    print(f"-- {len(plan)} case(s) in {time.perf_counter() - t0:.0f} s", flush=True)


def _json_path(args, env, ranks, loopback, node_size) -> pathlib.Path:
    device = env["device"].replace(" ", "-")
    name = f"{env['date'][:10]}_{device}_{args.mode}_{'lb' if loopback else 'ep'}{ranks}"
    if args.transport == "nvshmem":
        name += f"_nvshmem-nodes{ranks // node_size}"
    return pathlib.Path(args.out) / f"{name}{'_' + args.tag if args.tag else ''}.json"


def _write(path: pathlib.Path, record: dict) -> None:
    """Whole-file rewrite through a temporary name: a killed run leaves the last good file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
