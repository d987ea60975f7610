"""faiss kNN (moco.eval.knn.knn_predict) against a brute-force torch kNN, in the same run.

    python scripts/bench_knn.py [--bank 60000] [--queries 10000] [--dim 128] [--k 200]

Both sides get the same L2-normalised random clustered features; the torch side is a fair
brute force (chunked matmul + topk + scatter, all threads). Prints both times, the ratio and
whether the predictions agree.
"""

import argparse
import time

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


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=60000)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g)
    bank_labels = torch.randint(args.classes, (args.bank,), generator=g)
    query_labels = torch.randint(args.classes, (args.queries,), generator=g)
    bank = centres[bank_labels] + 2.0 * torch.randn(args.bank, args.dim, generator=g)
    queries = centres[query_labels] + 2.0 * torch.randn(args.queries, args.dim, generator=g)

    print(
        f"bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, "
        f"{torch.get_num_threads()} threads; best of {args.repeats}"
    )
    t_faiss, s_faiss = best_of(
        lambda: knn_predict(bank, bank_labels, queries, args.classes, args.k, 0.1), args.repeats
    )
    t_torch, s_torch = best_of(
        lambda: torch_knn(bank, bank_labels, queries, args.classes, args.k, 0.1), args.repeats
    )
    same = (s_faiss.argmax(1) == s_torch.argmax(1)).float().mean().item()
    print(f"faiss knn_predict : {t_faiss:.3f} s")
    print(f"torch brute force : {t_torch:.3f} s")
    print(f"speed-up          : {t_torch / t_faiss:.2f}x")
    print(
        f"same prediction   : {100 * same:.2f}% of queries; "
        f"top-1 {100 * (s_faiss.argmax(1) == query_labels).float().mean():.2f}%"
    )


if __name__ == "__main__":
    main()
