"""InfoNCE, the contrastive loss of MoCo: against a queue (v1/v2), or in the batch (v3)."""

import torch
import torch.nn.functional as F


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    left_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of picking each query's own key among it and the queue's negatives.

    q: N x C queries, k: N x C positive keys, negatives: K x C; all rows L2-normalised.
    ``left_out``: for each query, the row of ``negatives`` that is not its negative (its
    positive came from the queue, ``nearest_in_queue``), or None. Returns ``(loss, logits)``
    with logits N x (1+K), the positive in column 0, a left-out negative's logit at -inf.
    """
    # Computed in fp32 even under bf16/fp16 autocast: with T=0.07 a logit of 14 in bf16 is off
    # by up to 0.06, comparable to the gap between a hard negative and the positive.
    with torch.autocast(device_type=q.device.type, enabled=False):
        # Gradients reach only the queries: keys and negatives are targets, never trained.
        q, k, negatives = q.float(), k.detach().float(), negatives.detach().float()
        # 1/T is applied to the N x C queries, not to the N x (1+K) logits: with K=65536 that
        # saves a pass over a 64 MB tensor forward and backward (docs/speed.md;
        # scripts/benchmark.py --variants levers).
        q = q / temperature
        pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
        neg = q @ negatives.T  # N x K
        if left_out is not None:
            # A positive that also stood among the negatives would push its query away from it.
            neg = neg.scatter(1, left_out.unsqueeze(1), float("-inf"))
        logits = torch.cat([pos, neg], dim=1)  # N x (1+K), already divided by T
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target), logits


@torch.no_grad()
def nearest_in_queue(k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key's nearest neighbour among the queue's keys, by cosine (NNCLR, Dwibedi et al.
    2021): ``(neighbours N x C, their rows in the queue N)``. A neighbour is most often another
    image of the key's class, so taking it as the positive pulls a class together, not just two
    views of one image. k: N x C, queue: K x C, rows L2-normalised.
    """
    with torch.autocast(device_type=k.device.type, enabled=False):  # bf16 would break near-ties
        rows = (k.float() @ queue.float().T).argmax(dim=1)
    return queue[rows], rows


def contrastive_top1(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of queries whose positive (column 0) has the largest logit."""
    return (logits.argmax(dim=1) == 0).float().mean()


def in_batch_info_nce(
    q: torch.Tensor, keys: torch.Tensor, temperature: float, rank: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's contrastive loss: each query against the keys of the whole global batch.

    q: N x C queries of this rank; keys: (world*N) x C, every rank's keys in rank order (so the
    positive of query i on rank r is key r*N + i, the other keys are its negatives); all rows
    L2-normalised. Returns ``(loss, logits)``, logits N x (world*N). The cross-entropy is scaled
    by 2T, as in the paper's Algorithm 1: the gradient of CE/T grows as 1/T, the factor keeps
    its size about the same whatever T is.
    """
    # fp32 under autocast, as in info_nce.
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, keys = q.float(), keys.detach().float()  # keys are targets: no gradient
        logits = (q / temperature) @ keys.T  # N x (world*N)
        labels = in_batch_labels(q.shape[0], rank, q.device)  # N
        return F.cross_entropy(logits, labels) * (2 * temperature), logits


def in_batch_labels(n: int, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The column of each of rank ``rank``'s ``n`` queries' positive among the gathered keys."""
    return torch.arange(n, device=device) + n * rank


def in_batch_top1(logits: torch.Tensor, rank: int = 0) -> torch.Tensor:
    """Fraction of queries whose positive key (``in_batch_labels``) has the largest logit."""
    labels = in_batch_labels(logits.shape[0], rank, logits.device)
    return (logits.argmax(dim=1) == labels).float().mean()
