"""faiss kNN (moco.eval.knn.knn_predict) against a brute-force torch kNN, in the same run.

    python scripts/bench_knn.py [--bank 60000] [--queries 10000] [--dim 128] [--k 200]

Both sides get the same random clustered features and normalise them themselves; the torch side
is a fair brute force (chunked matmul + topk + scatter, all threads). The two sides run in turns
(faiss, torch, faiss, torch, ...) so that a load change on a shared machine hits both; each
prints the best and the median wall time and the process CPU time of its best run. Prints the
speed-up and whether the predictions agree.
"""

import argparse
import statistics
import time

import faiss
import torch
import torch.nn.functional as F

from moco.eval.knn import knn_predict


def torch_knn(bank, bank_labels, queries, num_classes, k, temperature, chunk=1024):
    bank = F.normalize(bank, dim=1)
    scores = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk], dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)  # chunk x k
        weights = torch.softmax(sims / temperature, dim=1)
        scores.append(torch.zeros(len(q), num_classes).scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(scores)


def timed(fn, record):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    record.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def summary(record):
    best = min(record)
    return best[0], statistics.median(w for w, _ in record), best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=60000)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-chunk", type=int, default=1024, help="queries per torch matmul")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g)
    bank_labels = torch.randint(args.classes, (args.bank,), generator=g)
    query_labels = torch.randint(args.classes, (args.queries,), generator=g)
    bank = centres[bank_labels] + 2.0 * torch.randn(args.bank, args.dim, generator=g)
    queries = centres[query_labels] + 2.0 * torch.randn(args.queries, args.dim, generator=g)

    print(
        f"bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}; "
        f"torch {torch.get_num_threads()} threads, faiss {faiss.omp_get_max_threads()}; "
        f"{args.repeats} runs each, in turns"
    )
    runs = {"faiss": [], "torch": []}
    for _ in range(args.repeats):
        s_faiss = timed(
            lambda: knn_predict(bank, bank_labels, queries, args.classes, args.k, 0.1),
            runs["faiss"],
        )
        s_torch = timed(
            lambda: torch_knn(
                bank, bank_labels, queries, args.classes, args.k, 0.1, args.torch_chunk
            ),
            runs["torch"],
        )
    (f_best, f_med, f_cpu), (t_best, t_med, t_cpu) = summary(runs["faiss"]), summary(runs["torch"])
    print(f"faiss knn_predict : best {f_best:.3f} s, median {f_med:.3f} s (cpu {f_cpu:.2f} s)")
    print(f"torch brute force : best {t_best:.3f} s, median {t_med:.3f} s (cpu {t_cpu:.2f} s)")
    print(f"speed-up          : {t_best / f_best:.2f}x best, {t_med / f_med:.2f}x median")
    same = (s_faiss.argmax(1) == s_torch.argmax(1)).float().mean().item()
    print(
        f"same prediction   : {100 * same:.2f}% of queries, scores within "
        f"{(s_faiss - s_torch).abs().max():.1e}; "
        f"top-1 {100 * (s_faiss.argmax(1) == query_labels).float().mean():.2f}%"
    )


if __name__ == "__main__":
    main()
