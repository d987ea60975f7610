"""Weighted k-nearest-neighbour classification of frozen features, on faiss.

The protocol of instance discrimination (Wu et al. 2018) and of the MoCo CIFAR demo: features are
L2-normalised, so an inner product is a cosine similarity; the k most similar bank features each
vote for their label with weight exp(sim / T).

The search is split from the vote so that a sweep over k and T searches once, at the largest k:
faiss returns neighbours sorted by similarity, so the first k columns are the top-k for any
smaller k.
"""

import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch
import torch.nn.functional as F

# Rows normalised and copied to faiss at a time: the float32 copies (bank into the index, query
# chunk) stay bounded however large the bank (1.28M ImageNet features) is.
CHUNK = 65536


def _normalised(features: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(features.detach().float(), dim=1).cpu().numpy())


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive row ranges covering ``range(n)``, sizes differing by at most one."""
    edges = [n * i // parts for i in range(parts + 1)] if parts else []
    return list(itertools.pairwise(edges))


def _min_blas_rows(dim: int) -> int:
    """Fewest queries for which faiss scores a search call with one BLAS matrix product.

    Below its threshold (``nq < 20`` up to faiss 1.14, ``nq * d < 128000`` from 1.15) faiss
    scores one query at a time, streaming the whole bank from memory once per query, several
    times slower per thread (docs/speed.md). A block of a split search must stay above it.
    """
    threshold = int(getattr(faiss.cvar, "distance_compute_blas_threshold", 20))
    return max(20, math.ceil(threshold / dim))


def _split(possible: int, threads: int) -> int:
    """How many query blocks: two per thread when there are enough queries (a thread slowed by
    another process then hands its second block over), else one per thread, else fewer."""
    if threads == 1:
        return min(1, possible)
    return next((b for b in (2 * threads, threads) if possible >= b), possible)


def _search_one_thread(
    index: faiss.Index, queries: np.ndarray, sims: np.ndarray, indices: np.ndarray
) -> None:
    # OpenMP thread counts are per calling thread: this worker's faiss (and its OpenBLAS) run
    # single-threaded; the caller's setting is untouched.
    faiss.omp_set_num_threads(1)
    index.search(queries, sims.shape[1], D=sims, I=indices)


def knn_search(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    chunk_size: int = CHUNK,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: similarities (N_test x k, best first) and bank indices (N_test x k).

    ``k`` is capped at the bank size. ``num_threads`` (default: faiss's OpenMP thread count,
    i.e. OMP_NUM_THREADS or all cores) is how many query blocks are searched at once.

    The queries are split into blocks, one or two per thread, each searched by a
    single-threaded faiss. faiss's own threading forks and joins at least twice per 4096 x 1024
    block of the similarity matrix (a parallel sgemm, then a parallel top-k update): ~350
    barriers for 10k queries on a 60k bank, each waiting for the slowest thread, which costs a
    lot on a shared CPU. Here the threads meet once, at the end. Every query is still compared
    with every bank row: the search stays exact.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature sizes differ: bank {train_features.shape[1]}, "
            f"queries {test_features.shape[1]}"
        )
    if len(train_features) == 0:
        raise ValueError("the kNN bank is empty: no training features to search")
    k = min(k, len(train_features))
    dim = train_features.shape[1]
    index = faiss.IndexFlatIP(dim)  # exact search, no training, no approximation
    for start in range(0, len(train_features), chunk_size):
        index.add(_normalised(train_features[start : start + chunk_size]))

    n = len(test_features)
    sims = np.empty((n, k), dtype=np.float32)  # filled in place, block by block
    indices = np.empty((n, k), dtype=np.int64)
    threads = max(1, num_threads or faiss.omp_get_max_threads())
    min_rows = _min_blas_rows(dim)
    with ThreadPoolExecutor(threads) as pool:
        # Chunks of near-equal size (not chunk_size + a remainder): no small last chunk.
        for c0, c1 in _bounds(n, math.ceil(n / chunk_size)):
            queries = _normalised(test_features[c0:c1])  # chunk x D
            blocks = max(1, _split(len(queries) // min_rows, threads))
            if blocks == 1 and num_threads is None:  # too few queries to split
                index.search(queries, k, D=sims[c0:c1], I=indices[c0:c1])  # faiss's threads
                continue
            jobs = [
                pool.submit(
                    _search_one_thread,
                    index,
                    queries[b0:b1],
                    sims[c0 + b0 : c0 + b1],
                    indices[c0 + b0 : c0 + b1],
                )
                for b0, b1 in _bounds(len(queries), blocks)
            ]
            for job in jobs:
                job.result()  # re-raises a worker's error
    return torch.from_numpy(sims), torch.from_numpy(indices)  # N_test x k each


def knn_vote(
    similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores (N x C) from the similarities and labels (N x k) of each query's neighbours.

    Each neighbour adds exp(sim / T) to its class. The weights are divided by their sum per query
    (a softmax over the neighbours): the same ranking of classes, no overflow at small T, and
    scores that sum to 1 per row.
    """
    weights = torch.softmax(similarities.float() / temperature, dim=1)  # N x k
    scores = torch.zeros(len(similarities), num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)  # N x C


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Weighted kNN class scores (N_test x C) of ``test_features`` against the labelled bank."""
    sims, indices = knn_search(train_features, test_features, k)
    return knn_vote(sims, train_labels.cpu()[indices], num_classes, temperature)


def knn_sweep(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: list[int],
    temperatures: list[float],
) -> dict[tuple[int, float], float]:
    """Top-1 accuracy (%) for every (k, T), from one search at the largest k."""
    sims, indices = knn_search(train_features, test_features, max(ks))
    neighbour_labels = train_labels.cpu()[indices]  # N_test x k_max
    test_labels = test_labels.cpu()
    results = {}
    for k in ks:
        for t in temperatures:
            scores = knn_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, t)
            results[(k, t)] = 100.0 * (scores.argmax(1) == test_labels).float().mean().item()
    return results
