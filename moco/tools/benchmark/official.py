"""The baseline a user would otherwise run: MoCo in plain PyTorch, written the way the official
implementation (facebookresearch/moco) writes it.

Kept apart from the project's own code on purpose: it must keep the official bookkeeping (a
Python loop for the momentum update, a clone of the queue, einsum + concat logits divided by T,
enqueue at a pointer) even where ``moco/`` does it differently, since that difference is what
the ``official`` variant and the levers measure. Method names follow the official code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from omegaconf import DictConfig


class OfficialStyleMoCo:
    """MoCo as the official implementation writes it, on one device, in fp32 and NCHW.

    Same backbone and head as ours (including SplitBatchNorm, as the official CIFAR demo uses on
    one GPU, and the matrix products of ``moco.small_map_conv``), so that only the MoCo
    bookkeeping and the memory format differ from ``moco``; ``floor_plain_convs`` measures the
    convolutions.
    """

    def __init__(self, cfg: DictConfig, device: str) -> None:
        from moco.encoders import Encoder, build_backbone, build_head

        m, d = cfg.model, cfg.data
        torch.manual_seed(0)
        net = build_backbone(m.backbone, d.channels, d.image_size, m.bn_splits, m.stem)
        self.encoder_q = Encoder(net, build_head(m.head, net.feature_dim, m.dim)).to(device)
        net = build_backbone(m.backbone, d.channels, d.image_size, m.bn_splits, m.stem)
        self.encoder_k = Encoder(net, build_head(m.head, net.feature_dim, m.dim)).to(device)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False
        self.m, self.t, self.k = m.momentum, m.temperature, m.queue_size
        self.queue = F.normalize(torch.randn(m.dim, self.k, device=device), dim=0)  # C x K
        self.ptr = 0

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        # zip without strict=, as the official code: the check would be a cost it does not pay.
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):  # noqa: B905
            p_k.data = p_k.data * self.m + p_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch = keys.shape[0]
        end = self.ptr + batch
        if end <= self.k:
            self.queue[:, self.ptr : end] = keys.T
        else:  # the official code asserts K % batch == 0 instead
            first = self.k - self.ptr
            self.queue[:, self.ptr :] = keys[:first].T
            self.queue[:, : batch - first] = keys[first:].T
        self.ptr = end % self.k

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.encoder_q(im_q), dim=1)  # N x C
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
            k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)  # N x C, shuffled
            k = k[torch.argsort(idx_shuffle)]  # N x C, original order
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.t  # N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return F.cross_entropy(logits, labels)


def info_nce_divided_logits(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official formulation: the N x (1+K) logits are divided by T (for comparison)."""
    pos = (q * k.detach()).sum(dim=1, keepdim=True)  # N x 1
    neg = q @ negatives.detach().T  # N x K
    logits = torch.cat([pos, neg], dim=1) / temperature  # N x (1+K)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), logits
