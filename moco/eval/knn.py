"""Weighted k-nearest-neighbour classification of frozen features, on faiss.

The protocol of instance discrimination (Wu et al. 2018) and of the MoCo CIFAR demo: features are
L2-normalised, so an inner product is a cosine similarity; the k most similar bank features each
vote for their label with weight exp(sim / T).

The search is split from the vote so that a sweep over k and T searches once, at the largest k:
faiss returns neighbours sorted by similarity, so the first k columns are the top-k for any
smaller k.
"""

import faiss
import numpy as np
import torch
import torch.nn.functional as F

# Rows normalised and copied to faiss at a time: the float32 copies (bank into the index, query
# chunk, N x k results) stay bounded however large the bank (1.28M ImageNet features) is.
CHUNK = 65536


def _normalised(features: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(features.detach().float(), dim=1).cpu().numpy())


def knn_search(
    train_features: torch.Tensor, test_features: torch.Tensor, k: int, chunk_size: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: similarities (N_test x k, best first) and bank indices (N_test x k).

    ``k`` is capped at the bank size.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature sizes differ: bank {train_features.shape[1]}, "
            f"queries {test_features.shape[1]}"
        )
    k = min(k, len(train_features))
    index = faiss.IndexFlatIP(
        train_features.shape[1]
    )  # exact search, no training, no approximation
    for start in range(0, len(train_features), chunk_size):
        index.add(_normalised(train_features[start : start + chunk_size]))
    sims, indices = [], []
    for start in range(0, len(test_features), chunk_size):
        s, i = index.search(_normalised(test_features[start : start + chunk_size]), k)
        sims.append(torch.from_numpy(s))
        indices.append(torch.from_numpy(i))
    return torch.cat(sims), torch.cat(indices)  # N_test x k each


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
