"""What every training module of the project shares: MoCo v1/v2 (``moco.model``), MoCo v3
(``moco.model_v3``) and the supervised reference (``moco.supervised``).

- Each checkpoint says how to rebuild the encoder (``encoder_spec``), so the evaluation scripts
  and ``moco.load_backbone`` need no config.
- A NaN or infinite loss stops the run with one line naming its first step, and no checkpoint
  is written after it (``moco.divergence`` says when the loss is read).
"""

import pytorch_lightning as pl
import torch

from moco.divergence import DivergenceGuard, refuse_non_finite_weights
from moco.encoders import EncoderSpec


class TrainingModule(pl.LightningModule):
    """A subclass sets ``encoder_spec`` in its constructor and passes each training loss to
    :meth:`watch_loss`; the hooks here do the rest."""

    encoder_spec: EncoderSpec

    def __init__(self) -> None:
        super().__init__()
        self.divergence = DivergenceGuard()

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Remember ``loss`` if it is the run's first non-finite one (no host read)."""
        self.divergence.observe(loss, self.global_step, self.current_epoch)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.divergence.after_batch(self.trainer)

    def on_train_end(self) -> None:
        self.divergence.check()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["encoder_spec"] = self.encoder_spec.to_dict()
        self.divergence.check()
        refuse_non_finite_weights(checkpoint["state_dict"], self.global_step, self.current_epoch)
