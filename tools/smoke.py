"""Quick GPU smoke check: one dispatch + combine per layout on loopback and EP=1, against the
reference backend on the same device, printing the first difference (for bring-up sessions)."""

import sys
import traceback

import jax
import numpy as np

sys.path.insert(0, "tests")
from harness import Runner, make_routing, make_tokens  # noqa: E402

import jax_ep  # noqa: E402

E, K, T, H = 16, 4, 12, 256
for R, mode in ((1, "shard_map"), (2, "loopback")):
    for layout in ("per_rank", "ragged", "expert_major"):
        try:
            idx, w = make_routing("random", R, T, K, E)
            x = make_tokens(R, T, H)
            outs = {}
            for backend in ("cuda", "reference"):
                runner = Runner(backend, R, mode, "gpu")
                g = runner.group(
                    num_experts=E,
                    num_topk=K,
                    hidden=H,
                    num_max_tokens_per_rank=T,
                    config=jax_ep.Config(sync_errors=True, timeout_s=5),
                )

                def fn(x, idx, w, g=g, layout=layout):
                    out = jax_ep.dispatch(x, idx, w, group=g, layout=layout)
                    return out, jax_ep.combine(out.x, out.handle, group=g)

                outs[backend] = runner.run(fn, x, idx, w)
            a, b = (jax.tree.leaves(outs[k]) for k in ("cuda", "reference"))
            bad = [
                i
                for i, (u, v) in enumerate(zip(a, b, strict=True))
                if u.shape != v.shape
                or not np.array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))
            ]
            names = [str(p) for p, _ in jax.tree_util.tree_flatten_with_path(outs["cuda"])[0]]
            verdict = "OK" if not bad else f"MISMATCH {[names[i] for i in bad]}"
            print(f"R={R} {mode} {layout}: {verdict}")
            for i in bad[:3]:
                print(
                    "   cuda",
                    np.asarray(a[i]).ravel()[:12],
                    "\n   ref ",
                    np.asarray(b[i]).ravel()[:12],
                )
        except Exception:
            print(f"R={R} {mode} {layout}: EXCEPTION")
            traceback.print_exc(limit=3)
