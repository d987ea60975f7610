"""The supervised reference: the pretraining backbone trained with the labels.

Not part of MoCo: the bar that self-supervised features are measured against. Same backbone,
data, augmented views, optimizer, schedule, checkpoints and kNN monitor as pretraining, only the
objective differs: cross-entropy through a linear classifier on the query view. Its encoder is
the backbone with that classifier as its head, so its checkpoints carry an encoder spec like
MoCo's and every evaluation script reads them.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from moco.encoders import EncoderSpec
from moco.optim.scheduled import lightning_optimizer
from moco.settings import plain_settings
from moco.training_module import TrainingModule


class SupervisedReference(TrainingModule):
    """Backbone + linear classifier, cross-entropy on the query view of each batch.

    Every argument comes from ``conf/model/supervised.yaml``. BatchNorm is plain: split BN only
    exists for MoCo's key encoder.
    """

    def __init__(
        self,
        *,
        backbone: str,
        stem: str,
        in_channels: int,
        image_size: int,
        channels_last: bool,
        num_classes: int,
        batch_size: int,
        lr_reference_batch: int,
        optimizer: Mapping,
        scheduler: Mapping,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(plain_settings(locals()))
        hp = self.hparams
        # The head is the classifier: num_classes logits, the "embedding" evaluation may read.
        self.encoder_spec = EncoderSpec(
            hp.backbone, hp.stem, hp.in_channels, hp.image_size, "linear", num_classes,
            hp.channels_last, final_relu=hp.final_relu,
        )  # fmt: skip
        self.encoder_q = self.encoder_spec.build()
        # Same optimizers and schedules as pretraining, so the same lr mistakes: the same guard.

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (view, _), labels = batch  # the second augmented view is not needed
        logits = self.encoder_q(view)  # N x classes
        loss = F.cross_entropy(logits, labels)
        top1 = (logits.argmax(dim=1) == labels).float().mean()
        self.watch_loss(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/top1", top1, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return lightning_optimizer(
            self.trainer, self.encoder_q.parameters(), hp.optimizer, hp.scheduler,
            hp.batch_size * self.trainer.world_size, hp.lr_reference_batch,
        )  # fmt: skip
