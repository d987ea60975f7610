"""MoCo as a LightningModule: composes the encoders, the momentum update, the queue and InfoNCE."""

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from moco.distributed import encode_shuffled, gather, world_size
from moco.encoders import EncoderSpec
from moco.errors import ConfigError
from moco.losses import contrastive_top1, info_nce, nearest_in_queue
from moco.momentum import momentum_update, scheduled_momentum
from moco.optim.scheduled import lightning_optimizer
from moco.queue import KeyQueue
from moco.settings import plain_settings
from moco.training_module import TrainingModule


def queue_too_small(queue_size: int, batch_size: int, world: int, symmetric: bool) -> str | None:
    """Why a queue of ``queue_size`` cannot take the keys one step enqueues, or None if it can:
    every rank enqueues the whole global batch (twice when symmetric)."""
    keys_per_step = batch_size * world * (2 if symmetric else 1)
    if queue_size >= keys_per_step:
        return None
    which = "global batch x 2, symmetric" if symmetric else "global batch"
    processes = f" by {world} processes" if world > 1 else ""
    return (
        f"model.queue_size={queue_size} is smaller than the {keys_per_step} keys enqueued per "
        f"step{processes} ({which}): raise model.queue_size or lower data.batch_size"
    )


class MoCo(TrainingModule):
    """Momentum Contrast (He et al. 2020; v2: Chen et al. 2020).

    Every argument comes from ``conf/model/moco.yaml`` (defaults live there, not here).
    ``optimizer`` is a Hydra config with ``_target_`` and a base ``lr`` for a global batch of
    ``lr_reference_batch``; ``scheduler`` holds ``name``, ``warmup_epochs`` and, for ``step``,
    ``milestones`` (fractions of training) and ``gamma``.
    """

    def __init__(
        self,
        *,
        backbone: str,
        in_channels: int,
        image_size: int,
        head: str,
        dim: int,
        queue_size: int,
        momentum: float,
        momentum_schedule: str,
        temperature: float,
        bn_splits: int,
        shuffle_bn: bool,
        symmetric: bool,
        channels_last: bool,
        batch_size: int,
        lr_reference_batch: int,
        optimizer: Mapping,
        scheduler: Mapping,
        stem: str = "auto",
        neighbour_weight: float = 0.0,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(plain_settings(locals()))
        hp = self.hparams
        self.encoder_spec = EncoderSpec(
            hp.backbone, hp.stem, hp.in_channels, hp.image_size, hp.head, hp.dim, hp.channels_last,
            final_relu=hp.final_relu,
        )  # fmt: skip
        self.encoder_q = self.encoder_spec.build(bn_splits)
        # The key encoder starts as an exact copy (backbone AND head) and never gets gradients:
        # it only moves through momentum_update.
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.queue = KeyQueue(hp.queue_size, hp.dim)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (view_q, view_k, *small_crops), _ = batch
        hp = self.hparams
        # Update the key encoder before encoding keys, so this step's keys come from the
        # encoder that includes the last optimizer step (Algorithm 1 of the paper).
        momentum_update(self.encoder_q, self.encoder_k, self._current_momentum())
        # The negatives are read once, before this step's keys enter the queue. A copy, because
        # enqueue writes the buffer in place while the logits still need it for backward.
        negatives = self.queue.keys.clone()  # K x C
        loss, logits, keys = self.contrast(view_q, view_k, negatives)
        if small_crops:
            loss = self.with_small_crops(loss, small_crops, keys, negatives)
        if hp.symmetric:
            loss_21, _, keys_21 = self.contrast(view_k, view_q, negatives)
            loss = loss + loss_21
            keys = torch.cat([keys, keys_21])  # 2N x C
        # Every rank enqueues the keys of the whole global batch, in rank order, so the queues
        # stay identical across ranks and the pointer advances by the global batch.
        self.queue.enqueue(gather(keys))
        self.watch_loss(loss)

        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/top1", contrastive_top1(logits), prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def contrast(self, im_q, im_k, negatives):
        """InfoNCE of queries from ``im_q`` against keys from ``im_k``; also returns the keys."""
        q = F.normalize(self.encoder_q(im_q), dim=1)  # N x C
        with torch.no_grad():
            k = F.normalize(self._encode_keys(im_k), dim=1)  # N x C
        loss, logits = self.info_nce_against(q, k, negatives)  # logits: N x (1+K)
        return loss, logits, k

    def info_nce_against(self, q, keys, negatives):
        """InfoNCE of queries ``q`` whose positives are ``keys``. With ``model.neighbour_weight``
        w > 0, that share of the loss takes as positives the queue's nearest neighbours of
        ``keys`` (which then leave the negatives); the logits are those of the own keys' term
        unless w = 1."""
        t, w = self.hparams.temperature, self.hparams.neighbour_weight
        if w == 0:
            return info_nce(q, keys, negatives, t)
        neighbours, rows = nearest_in_queue(keys, negatives)
        nn_loss, nn_logits = info_nce(q, neighbours, negatives, t, left_out=rows)
        if w == 1:
            return nn_loss, nn_logits
        own_loss, own_logits = info_nce(q, keys, negatives, t)
        return (1 - w) * own_loss + w * nn_loss, own_logits

    def with_small_crops(self, loss, small_crops, keys, negatives) -> torch.Tensor:
        """``loss`` of the first view's queries averaged with that of the small crops (m crops of
        each image, each a query against the image's key), every query weighing the same. The
        small crops share one pass through the query encoder; they never become keys."""
        m = len(small_crops)
        q = F.normalize(self.encoder_q(torch.cat(small_crops)), dim=1)  # mN x C
        crops_loss, _ = self.info_nce_against(q, keys.repeat(m, 1), negatives)
        return (loss + m * crops_loss) / (1 + m)

    def _encode_keys(self, im_k):
        # Shuffling only matters when BatchNorm sees groups smaller than the global batch:
        # SplitBatchNorm splits on one process, or one group per rank under DDP. A single
        # whole-batch BN is blind to the order, so the shuffle would only cost time.
        if self.hparams.shuffle_bn and (self.hparams.bn_splits > 1 or world_size() > 1):
            return encode_shuffled(self.encoder_k, im_k)
        return self.encoder_k(im_k)

    def _current_momentum(self) -> float:
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else None
        hp = self.hparams
        return scheduled_momentum(hp.momentum, hp.momentum_schedule, self.global_step, total)

    def setup(self, stage: str) -> None:
        # The config check counts devices x nodes; this is the world Lightning really started.
        hp = self.hparams
        world = self.trainer.world_size
        problem = queue_too_small(self.queue.size, hp.batch_size, world, hp.symmetric)
        if problem:
            raise ConfigError(problem)

    # ---------------------------------------------------------------------------- optimizer
    def global_batch_size(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.hparams.batch_size * world

    def configure_optimizers(self):
        hp = self.hparams
        return lightning_optimizer(
            self.trainer, self.encoder_q.parameters(), hp.optimizer, hp.scheduler,
            self.global_batch_size(), hp.lr_reference_batch,
        )  # fmt: skip
