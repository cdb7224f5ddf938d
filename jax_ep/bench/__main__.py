"""CLI: ``python -m jax_ep.bench [--mode ht|low-latency|layer] ...`` (``--help`` lists the options).

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
import json
import os
import pathlib
import subprocess
import sys


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
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (ht 4096, ll 128)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=None, help="experts (ht 256, ll 288)")
    p.add_argument("--ranks", type=int, default=None, help="EP ranks (default: all GPUs)")
    p.add_argument("--loopback", type=int, default=None, help="virtual ranks on one GPU")
    p.add_argument("--layouts", default="ragged,per_rank", help="comma list (ht)")
    p.add_argument("--backends", default="cuda,reference", help="jax_ep backends to time")
    p.add_argument(
        "--baselines",
        default="ragged_all_to_all,all_to_all",
        help="comma list of baselines, or 'none'",
    )
    p.add_argument("--sweep", default="", help="comma list of token counts (ht)")
    p.add_argument("--num-sms", type=int, default=0, help="SMs of the send kernels (0: default)")
    p.add_argument(
        "--num-copy-sms", type=int, default=0, help="SMs of the copy kernels (0: all SMs)"
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
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--chain", type=int, default=16, help="ops per program (low-latency)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="low-latency: add a kernel breakdown from the JAX profiler to each result",
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
    from jax_ep.bench import cases, timing

    env = timing.environment()
    ll = args.mode == "low-latency"
    tokens = args.tokens or (128 if ll else 4096)
    experts = args.experts or (288 if ll else 256)
    num_gpus = len(jax.devices())
    loopback = args.loopback is not None
    ranks = args.loopback if loopback else (args.ranks or num_gpus)
    config = jax_ep.Config(
        num_sms=args.num_sms,
        num_copy_sms=args.num_copy_sms,
        transport=args.transport,
        node_size=args.node_size,
    )
    backends = [b for b in args.backends.split(",") if b]
    if jax_ep.default_backend() != "cuda":
        print(
            f"note: CUDA backend unavailable here ({jax.devices()[0].platform}); timing the "
            "reference backend and baselines only",
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
        ),
    )
    if ll:
        record["config"].update(chain=args.chain, graphs=args.graphs, fp8=not args.no_fp8)
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
    else:
        record["copy_bandwidth_GBps"] = timing.copy_bandwidth_gbps(jax.devices()[0])
        print(f"  plain copy (read+write): {record['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
        results = []
        for t in [int(v) for v in args.sweep.split(",")] if args.sweep else [tokens]:
            setup.tokens = t
            print(f"-- {t} tokens/rank", flush=True)
            results += cases.ht_cases(
                setup,
                layouts=args.layouts.split(","),
                backends=backends,
                baselines_wanted=base,
                calls=args.calls,
                repeats=args.repeats,
                config=config,
            )
        record["results"] = results
    if jax.process_index() != 0:
        return 0
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = env["device"].replace(" ", "-")
    name = f"{env['date'][:10]}_{device}_{args.mode}_{'lb' if loopback else 'ep'}{ranks}"
    if args.transport == "nvshmem":
        name += f"_nvshmem-nodes{ranks // setup.node_size}"
    path = out_dir / f"{name}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
