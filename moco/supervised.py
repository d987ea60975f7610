"""The supervised reference: the pretraining backbone trained with the labels instead of MoCo.

It answers "how good do this backbone's features get on this data set when the labels are
used?", the bar that kNN on self-supervised features is read against (README "Results"). It runs
through the pretraining pipeline (``+experiment=supervised``): same data module and augmented
views, optimizer, LR schedule, checkpoints and kNN monitor. Its checkpoints read like MoCo's:
``encoder_q`` is the backbone with a linear classifier as its head, so every evaluation script
takes them unchanged.
"""

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from moco.encoders import Encoder, build_backbone, build_head
from moco.model import _plain
from moco.optim.training import scheduled_optimizer


class SupervisedReference(pl.LightningModule):
    """Backbone + linear classifier, cross-entropy on the query view of each batch.

    ``**moco_only`` takes the MoCo settings of ``conf/model/moco.yaml`` (queue, temperature,
    momentum, ...): they stay in the composed config, which is validated as a pretraining config,
    but mean nothing here. BatchNorm is plain: split BN only exists for MoCo's key encoder.
    """

    def __init__(
        self,
        *,
        backbone: str,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels_last: bool,
        batch_size: int,
        lr_reference_batch: int,
        optimizer: Any,
        scheduler: Any,
        stem: str = "auto",
        **moco_only: Any,
    ) -> None:
        super().__init__()
        settings = {k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__")}
        del settings["moco_only"]
        # head and dim as the evaluation scripts rebuild the encoder from a checkpoint.
        self.save_hyperparameters({**settings, "head": "linear", "dim": num_classes})
        net = build_backbone(backbone, in_channels, image_size, 1, stem)
        self.encoder_q = Encoder(
            net, build_head("linear", net.feature_dim, num_classes), channels_last
        )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (view, _), labels = batch  # the second augmented view is not needed
        logits = self.encoder_q(view)  # N x classes
        loss = F.cross_entropy(logits, labels)
        top1 = (logits.argmax(dim=1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/top1", top1, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        config, _ = scheduled_optimizer(
            self.trainer,
            self.encoder_q.parameters(),
            hp.optimizer,
            hp.scheduler,
            hp.batch_size * self.trainer.world_size,
            hp.lr_reference_batch,
        )
        return config
