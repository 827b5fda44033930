"""Exact vs IVF faiss search over embedding-sized rows: where fluxvit-search switches (``IVF_ABOVE``).

Measured, not asserted. Rows are L2-normalised clustered random vectors (512 dims, 1000 clusters, so IVF's recall
is meaningful); queries are noisy copies of indexed rows. For each size: build time, ms per single query on one
thread, and IVF's recall@1 against the exact index. Prints a table and writes JSON.

    python benchmarks/bench_search.py [--sizes 10000 50000 200000] [--out runs/bench/search.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np


def clustered(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    import faiss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--out", default="runs/bench/search.json")
    args = p.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    load_before = os.getloadavg()[0]
    for n in args.sizes:
        x = clustered(n, args.dim, rng)
        q = x[rng.integers(0, n, args.queries)] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        t0 = time.perf_counter()
        exact = np.stack([flat.search(q[i:i + 1], 1)[1][0] for i in range(len(q))])
        flat_ms = 1000 * (time.perf_counter() - t0) / len(q)
        nlist = int(min(max(16, math.sqrt(n)), n // 39))
        t0 = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
        ivf.add(x)
        build_s = time.perf_counter() - t0
        ivf.nprobe = min(args.nprobe, nlist)
        t0 = time.perf_counter()
        approx = np.stack([ivf.search(q[i:i + 1], 1)[1][0] for i in range(len(q))])
        ivf_ms = 1000 * (time.perf_counter() - t0) / len(q)
        recall = float((approx[:, 0] == exact[:, 0]).mean())
        rows.append({"rows": n, "dim": args.dim, "flat_ms_per_query": round(flat_ms, 3), "ivf_nlist": nlist,
                     "ivf_nprobe": ivf.nprobe, "ivf_build_s": round(build_s, 2), "ivf_ms_per_query": round(ivf_ms, 3),
                     "ivf_recall_at_1": round(recall, 4)})
        print(f"{n:>8d} rows: exact {flat_ms:7.2f} ms/query | IVF{nlist} nprobe {ivf.nprobe}: {ivf_ms:6.2f} ms/query, "
              f"recall@1 {recall:.3f}, build {build_s:.1f} s", flush=True)
    report = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "threads": 1, "cpu_count": os.cpu_count(),
              "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"load average (1 min) {load_before:.1f} before, {report['load_1min_after']:.1f} after; wrote {args.out}")


if __name__ == "__main__":
    main()
