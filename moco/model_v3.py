"""MoCo v3 as a LightningModule: no queue; the keys of the global batch are the negatives.

Chen, Xie and He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers".
Both views go through the base encoder (backbone + projector) and the predictor for queries,
and through the momentum encoder (backbone + projector, no predictor) for keys; each view's
queries are contrasted with the other view's keys. The module names are those of the official
code (``base_encoder`` whose classifier slot, a ResNet's ``fc``, holds the projector,
``momentum_encoder``, ``predictor``), so its weights and an official checkpoint's map one to one
(``module.`` aside).
"""

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from moco.distributed import gather, rank
from moco.encoders import (
    V3_HEAD,
    Encoder,
    EncoderSpec,
    build_predictor,
    head_in_slot,
    slot_view,
    zero_init_residual,
)
from moco.losses import in_batch_info_nce, in_batch_top1
from moco.momentum import momentum_update, scheduled_momentum
from moco.optim.scheduled import lightning_optimizer
from moco.settings import plain_settings
from moco.training_module import TrainingModule

# The modules whose BatchNorm layers become SyncBatchNorm under DDP (model.sync_bn).
MODULES = ("base_encoder", "momentum_encoder", "predictor")


class MoCoV3(TrainingModule):
    """MoCo v3 on any backbone of ``moco.encoders``: ResNets, or ViTs (``backbone=vit_small``,
    ``moco/vit.py``). Per backbone, ``moco.encoders`` says the attribute that holds the
    projector (``SLOTS``) and its depth (``V3_PROJECTOR_LAYERS``).

    Every argument comes from ``conf/model/moco_v3.yaml`` (defaults live there, not here);
    ``optimizer`` and ``scheduler`` as for ``moco.MoCo``.
    """

    def __init__(
        self,
        *,
        backbone: str,
        in_channels: int,
        image_size: int,
        dim: int,
        mlp_dim: int,
        momentum: float,
        momentum_schedule: str,
        temperature: float,
        sync_bn: bool,
        channels_last: bool,
        batch_size: int,
        lr_reference_batch: int,
        optimizer: Mapping,
        scheduler: Mapping,
        stem: str = "auto",
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(plain_settings(locals()))
        hp = self.hparams
        self.encoder_spec = EncoderSpec(
            hp.backbone, hp.stem, hp.in_channels, hp.image_size, V3_HEAD, hp.dim,
            hp.channels_last, hp.mlp_dim, hp.final_relu,
        )  # fmt: skip
        self.slot = self.encoder_spec.slot  # "fc": where the projector sits in the network
        encoder = self.encoder_spec.build()
        # As the official code: each residual block starts as the identity.
        zero_init_residual(encoder.backbone)
        self.base_encoder = head_in_slot(encoder, self.slot)
        # An exact copy (projector included) that never gets gradients: it only moves through
        # momentum_update. The predictor exists on the base side only.
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)
        self.predictor = build_predictor(hp.backbone, hp.dim, hp.mlp_dim)

    # The base and momentum encoders seen as backbone + head (``moco.encoders.Encoder``), the
    # names by which the kNN monitor and init= read every method's query and key encoders.
    @property
    def encoder_q(self) -> Encoder:
        return slot_view(self.base_encoder, self.slot, self.hparams.channels_last)

    @property
    def encoder_k(self) -> Encoder:
        return slot_view(self.momentum_encoder, self.slot, self.hparams.channels_last)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (view_1, view_2), _ = batch
        if self.hparams.channels_last:
            view_1, view_2 = (
                v.contiguous(memory_format=torch.channels_last) for v in (view_1, view_2)
            )
        m = self._current_momentum()
        # Each view separately: BatchNorm normalises every view with its own batch statistics,
        # as the official code does.
        q1 = self.predictor(self.base_encoder(view_1))  # N x dim
        q2 = self.predictor(self.base_encoder(view_2))  # N x dim
        with torch.no_grad():
            # Before the keys: this step's keys come from the encoder that includes the last
            # optimizer step (Algorithm 1).
            momentum_update(self.base_encoder, self.momentum_encoder, m)
            k1 = self.momentum_encoder(view_1)  # N x dim
            k2 = self.momentum_encoder(view_2)
        # Symmetric: each view's queries against the other view's keys.
        loss_12, logits = self.contrast(q1, k2)  # logits: N x (world*N)
        loss_21, _ = self.contrast(q2, k1)
        loss = loss_12 + loss_21
        self.watch_loss(loss)

        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        top1 = in_batch_top1(logits, rank())
        self.log("train/top1", top1, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/momentum", m, on_step=True, on_epoch=False)
        return loss

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of this rank's queries ``q`` (N x dim) against the keys of every rank
        (gathered from ``k``, N x dim per rank, without gradient); ``(loss, logits)``."""
        q = F.normalize(q, dim=1)  # N x C
        keys = gather(F.normalize(k.detach(), dim=1))  # world*N x C, rank order
        return in_batch_info_nce(q, keys, self.hparams.temperature, rank())

    def _current_momentum(self) -> float:
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else None
        hp = self.hparams
        return scheduled_momentum(hp.momentum, hp.momentum_schedule, self.global_step, total)

    def setup(self, stage: str) -> None:
        # The official code normalises with the statistics of the whole global batch
        # (SyncBatchNorm) under DDP. torch syncs BatchNorm on GPUs only: on CPUs each process
        # keeps its own statistics.
        if not self.hparams.sync_bn or self.trainer.world_size == 1:
            return
        if self.trainer.strategy.root_device.type == "cpu":
            rank_zero_warn(
                "model.sync_bn: SyncBatchNorm needs GPUs; on CPUs BatchNorm stays per process"
            )
            return
        for name in MODULES:
            setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self, name)))

    # ---------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        hp = self.hparams
        # The base encoder and the predictor; the momentum encoder has no gradients.
        params = [*self.base_encoder.parameters(), *self.predictor.parameters()]
        return lightning_optimizer(
            self.trainer, params, hp.optimizer, hp.scheduler,
            hp.batch_size * self.trainer.world_size, hp.lr_reference_batch,
        )  # fmt: skip
