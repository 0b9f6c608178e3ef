"""Prompt-bank search speed: single-query latency and recall@10 against exact search, build time, memory.

    python benchmarks/bank_speed.py                              # 10k, 100k, 1M x 384 and 1024 (long)
    python benchmarks/bank_speed.py --sizes 10000 100000 --dims 384 --json out.json

Data: clustered synthetic embeddings on the unit sphere, as a bank's image embeddings are (see ``Mixture``):
``--clusters`` Gaussian clusters with uniform random centres and log-normal weights (uneven class sizes), each
spread mostly along its own ``--intrinsic``-dimensional subspace plus isotropic noise (real embedding sets have
low intrinsic dimension; ``--intrinsic 0`` gives isotropic clusters, the worst case for approximate search).
Queries are fresh draws from the same mixture, never bank vectors.

Every index goes through the bank's own wrapper (``incontext.retrieve.index.VectorIndex``: IDMap2 around flat
and HNSW, native ids for IVF), so the figures are what a bank search costs. Exact ground truth and the
``Flat`` row use ``faiss.knn`` on the data array (what ``IndexFlatIP`` runs, without a second copy of the data).

Reported per index and search setting: recall@10 (mean fraction of the exact top-10 ids returned), median and
p95 single-query latency (one query per call, ``--search-threads`` FAISS threads), build time (train + add,
``--build-threads`` threads) and index memory (serialized size, which is what the index holds in RAM). The last
table picks, per (N, d) and index, the fastest setting with recall@10 >= ``--target``.

The machine is shared: the load average before and after each block is printed, and latencies are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from incontext.retrieve.index import VectorIndex  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Mixture:
    """Gaussian clusters on the unit sphere.

    ``clusters`` centres uniform on the sphere, log-normal weights (uneven class sizes). A point of cluster c is
    ``normalize(centre_c + spread * (U_c z / sqrt(r) + iso * g / sqrt(d)))``, z ~ N(0, I_r) in a random
    r-dimensional subspace U_c of the cluster (``intrinsic`` r; real embedding sets have low intrinsic
    dimension) and g ~ N(0, I_d) isotropic. ``intrinsic=0`` gives isotropic clusters, the worst case for
    approximate search: in high dimension all members of a cluster are almost equidistant from a query.
    """

    def __init__(self, d: int, clusters: int, spread: float, intrinsic: int, iso: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.d, self.spread, self.r, self.iso = d, spread, intrinsic, iso if intrinsic else 1.0
        self.centres = self.rng.standard_normal((clusters, d), dtype=np.float32)
        faiss.normalize_L2(self.centres)
        w = self.rng.lognormal(0.0, 1.0, clusters)
        self.w = w / w.sum()
        self.bases = None
        if intrinsic:
            b = self.rng.standard_normal((clusters, d, intrinsic), dtype=np.float32)
            self.bases = np.linalg.qr(b)[0].astype(np.float32)  # (clusters, d, r) orthonormal columns

    def sample(self, n: int) -> np.ndarray:
        """(n, d) float32 unit vectors in random order."""
        which = self.rng.choice(len(self.centres), size=n, p=self.w)
        out = np.empty((n, self.d), np.float32)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(self.centres) + 1))
        s_iso = np.float32(self.spread * self.iso / np.sqrt(self.d))
        for c in range(len(self.centres)):
            rows = order[bounds[c]:bounds[c + 1]]
            if not len(rows):
                continue
            x = self.centres[c] + s_iso * self.rng.standard_normal((len(rows), self.d), dtype=np.float32)
            if self.bases is not None:
                z = self.rng.standard_normal((len(rows), self.r), dtype=np.float32)
                x += np.float32(self.spread / np.sqrt(self.r)) * (z @ self.bases[c].T)
            out[rows] = x
        faiss.normalize_L2(out)
        return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def time_single(search, xq: np.ndarray, threads: int) -> tuple[float, float]:
    """Median and p95 latency in ms of one-query calls."""
    faiss.omp_set_num_threads(threads)
    search(xq[:1])  # warm-up
    ts = []
    for q in xq:
        t0 = time.perf_counter()
        search(q[None])
        ts.append(1000 * (time.perf_counter() - t0))
    return float(np.median(ts)), float(np.percentile(ts, 95))


def nlist_for(n: int) -> int:
    """~4 sqrt(N) lists rounded to a power of two (the FAISS wiki's 4..16 sqrt(N) guideline, low end)."""
    return 1 << max(4, int(round(np.log2(4 * np.sqrt(n)))))


def run_block(n: int, d: int, args: argparse.Namespace) -> list[dict]:
    log(f"== N={n:,} d={d}  (load {load()})")
    t0 = time.perf_counter()
    mix = Mixture(d, args.clusters, args.spread, args.intrinsic, args.iso, args.seed)
    xb = mix.sample(n)
    xq = mix.sample(args.queries)
    log(f"   data {time.perf_counter() - t0:.1f}s")
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    log(f"   exact ground truth {time.perf_counter() - t0:.1f}s")
    rows: list[dict] = []
    lat_q = xq[: args.latency_queries]

    def row(index: str, setting: str, rec: float, lat: tuple[float, float], build: float, mem: int) -> None:
        r = {"n": n, "d": d, "index": index, "setting": setting, "recall@10": round(rec, 4),
             "median_ms": round(lat[0], 3), "p95_ms": round(lat[1], 3), "build_s": round(build, 1),
             "memory_mb": round(mem / 2**20, 1)}
        rows.append(r)
        log(f"   {index:<16} {setting:<12} recall@10 {rec:.3f}  median {lat[0]:8.3f} ms  p95 {lat[1]:8.3f} ms"
            f"  build {build:7.1f}s  mem {mem / 2**20:8.1f} MB")

    # Exact search: what IndexFlatIP does, on the data array itself.
    flat_q = lat_q[: max(5, min(len(lat_q), int(2e8 // (n * d)) or 5))]  # fewer timed queries when slow
    lat = time_single(lambda q: faiss.knn(q, xb, 10, metric=faiss.METRIC_INNER_PRODUCT), flat_q,
                      args.search_threads)
    row("Flat", "exact", 1.0, lat, 0.0, xb.nbytes)

    nl = nlist_for(n)
    centroids = None
    for family in args.families:
        if family == "HNSW32" and n * d > args.hnsw_max:
            log(f"   HNSW32 skipped (N*d above --hnsw-max {args.hnsw_max:.0e}: build too long on this machine)")
            continue
        factory = {"IVF-Flat": f"IVF{nl},Flat", "IVF-SQ8": f"IVF{nl},SQ8",
                   "IVF-PQfs+SQ8": f"IVF{nl},PQ{d // 4}x4fs,Refine(SQ8)", "HNSW32": "HNSW32"}[family]
        faiss.omp_set_num_threads(args.build_threads)
        t0 = time.perf_counter()
        vi = VectorIndex(d, factory, train_iters=args.train_iters, k_factor=args.k_factor)
        if vi.kind == "ivf" and centroids is not None:
            # Share the coarse quantizer across IVF variants: the same k-means, trained once.
            faiss.extract_index_ivf(vi.index).quantizer.add(centroids)
        if vi.kind == "hnsw":
            vi._inner().hnsw.efConstruction = args.ef_construction
        if not vi.is_trained:
            sample = min(n, args.train_per_list * nl if vi.kind == "ivf" else n)
            vi.train(xb, max_size=sample, seed=args.seed)
        train_s = time.perf_counter() - t0
        vi.add(xb, np.arange(n, dtype=np.int64))
        build = time.perf_counter() - t0
        if vi.kind == "ivf" and centroids is None:
            q = faiss.extract_index_ivf(vi.index).quantizer
            centroids = faiss.rev_swig_ptr(faiss.downcast_index(q).get_xb(), nl * d).reshape(nl, d).copy()
            args._ivf_train_s = train_s
        if vi.kind == "ivf" and family != "IVF-Flat":
            build += getattr(args, "_ivf_train_s", 0.0)  # charge the shared k-means to every IVF variant
        mem = len(vi.to_bytes())
        settings = args.nprobe if vi.kind == "ivf" else args.ef_search
        for v in settings:
            if vi.kind == "ivf":
                vi.nprobe = min(v, nl)
            else:
                vi.ef_search = v
            vi._apply_search_settings()
            faiss.omp_set_num_threads(args.build_threads)
            _, found = vi.search(xq, 10)
            rec = recall_at(found, gt)
            lat = time_single(lambda q, vi=vi: vi.search(q, 10), lat_q, args.search_threads)
            row(family, f"{'nprobe' if vi.kind == 'ivf' else 'efSearch'}={v}", rec, lat, build, mem)
            if rec >= 0.999:
                break
        del vi
    log(f"   (load {load()}, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB)")
    return rows


def markdown(rows: list[dict], target: float) -> str:
    lines = ["| N | d | index | setting | recall@10 | median ms | p95 ms | build s | memory MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['d']} | {r['index']} | {r['setting']} | {r['recall@10']:.3f} | "
                     f"{r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['build_s']:.1f} | {r['memory_mb']:.1f} |")
    best = [f"\nFastest setting with recall@10 >= {target} per (N, d, index):\n",
            "| N | d | index | setting | recall@10 | median ms | build s | memory MB |",
            "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["n"], r["d"], r["index"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        ok = [r for r in rows if (r["n"], r["d"], r["index"]) == key and r["recall@10"] >= target]
        if not ok:
            top = max((r for r in rows if (r["n"], r["d"], r["index"]) == key), key=lambda r: r["recall@10"])
            best.append(f"| {key[0]:,} | {key[1]} | {key[2]} | (max {top['setting']}) | {top['recall@10']:.3f} | "
                        f"{top['median_ms']:.3f} | {top['build_s']:.1f} | {top['memory_mb']:.1f} |")
            continue
        r = min(ok, key=lambda r: r["median_ms"])
        best.append(f"| {key[0]:,} | {key[1]} | {key[2]} | {r['setting']} | {r['recall@10']:.3f} | "
                    f"{r['median_ms']:.3f} | {r['build_s']:.1f} | {r['memory_mb']:.1f} |")
    return "\n".join(lines + best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 1024])
    ap.add_argument("--families", nargs="+", default=["IVF-Flat", "IVF-SQ8", "IVF-PQfs+SQ8", "HNSW32"])
    ap.add_argument("--clusters", type=int, default=3000)
    ap.add_argument("--spread", type=float, default=1.0, help="cluster radius relative to its centre (norm 1)")
    ap.add_argument("--intrinsic", type=int, default=16, help="dimension of each cluster's main subspace "
                                                              "(0 = isotropic clusters, the worst case)")
    ap.add_argument("--iso", type=float, default=0.25, help="isotropic noise relative to --spread")
    ap.add_argument("--k-factor", type=int, default=4, help="re-ranked candidates per result (Refine)")
    ap.add_argument("--queries", type=int, default=500, help="queries for recall")
    ap.add_argument("--latency-queries", type=int, default=200, help="single-query calls timed per setting")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--ef-construction", type=int, default=40, help="HNSW build quality (FAISS default 40)")
    ap.add_argument("--train-per-list", type=int, default=40, help="IVF training points per list (FAISS warns < 39)")
    ap.add_argument("--train-iters", type=int, default=10)
    ap.add_argument("--hnsw-max", type=float, default=4.0e8, help="skip HNSW when N*d exceeds this")
    ap.add_argument("--build-threads", type=int, default=1,
                    help="FAISS threads for training/adding (1 is fastest when other processes share the cores)")
    ap.add_argument("--search-threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    log(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, load {load()}; build threads {args.build_threads}, "
        f"search threads {args.search_threads}")
    rows: list[dict] = []
    for d in args.dims:
        for n in args.sizes:
            rows += run_block(n, d, args)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, args.target))


if __name__ == "__main__":
    main()
