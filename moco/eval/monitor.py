"""Online kNN monitor: the weighted-kNN top-1 of the query backbone, logged during pretraining.

Under DDP each process encodes its own shard of the bank and of the test images: the bank shards
are all-gathered (every process needs the whole bank to search), each process classifies its test
shard, and the counts of correct predictions are summed, so every process logs the same number.
"""

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from moco.distributed import broadcast_buffers
from moco.eval.features import FrozenFeatures, encode, eval_dataset, feature_loader
from moco.eval.knn import knn_predict


class KNNMonitor(pl.Callback):
    """Every ``every_n_epochs`` training epochs, log ``knn_top1`` (%) of ``encoder_q``'s features.

    ``bank_size`` / ``test_size`` cap the training images in the bank and the test images (a fixed
    random subset, the same every epoch so that the numbers are comparable); None means all.
    The data are loaded here, so a data problem shows before training starts.
    """

    def __init__(
        self,
        data_cfg: DictConfig,
        *,
        every_n_epochs: int,
        k: int,
        temperature: float,
        bank_size: int | None,
        test_size: int | None,
        batch_size: int,
        layer: str,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.batch_size, self.layer = batch_size, layer
        self.num_classes, self.num_workers = data_cfg.num_classes, data_cfg.num_workers
        self.bank = eval_dataset(data_cfg, "train", bank_size, seed)
        self.test = eval_dataset(data_cfg, "test", test_size, seed)
        # Made at the first evaluation of a fit, when the process's shard is known, and kept to
        # its end: their workers start once, not every epoch (seconds each when spawned).
        self._loaders: dict[str, DataLoader] = {}

    @classmethod
    def from_config(cls, eval_cfg: DictConfig, data_cfg: DictConfig) -> "KNNMonitor | None":
        """The monitor conf/eval/knn_monitor.yaml describes (its values checked with the rest of
        the pretraining config, moco.run.check), or None when disabled."""
        if not eval_cfg.enabled:
            return None
        keys = ("every_n_epochs", "k", "temperature", "bank_size", "test_size", "batch_size")
        return cls(data_cfg, **{key: eval_cfg[key] for key in keys}, layer=str(eval_cfg.layer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            pl_module.log(
                "knn_top1", self.evaluate(trainer, pl_module), prog_bar=True, on_epoch=True
            )

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """kNN top-1 (%) of the current query encoder; to be called on every process."""
        world = trainer.world_size
        # Under DDP without buffer broadcasts each rank's BN running statistics drift apart:
        # take rank 0's (the ones its checkpoint saves), so all ranks encode with one model.
        broadcast_buffers(pl_module.encoder_q)
        bank_x, bank_y = self._features(trainer, pl_module, self.bank, "bank")
        # all_gather needs the same shape everywhere: pad every shard to the longest, label -1.
        longest = -(-len(self.bank) // world)
        pad = longest - len(bank_x)
        bank_x = torch.cat([bank_x, bank_x.new_zeros(pad, bank_x.shape[1])]).to(pl_module.device)
        bank_y = torch.cat([bank_y, bank_y.new_full((pad,), -1)]).to(pl_module.device)
        bank_x, bank_y = pl_module.all_gather(bank_x), pl_module.all_gather(bank_y)
        if world > 1:  # world x longest x D -> (world * longest) x D
            bank_x, bank_y = bank_x.flatten(0, 1), bank_y.flatten(0, 1)
        real = bank_y >= 0
        bank_x, bank_y = bank_x[real].cpu(), bank_y[real].cpu()

        test_x, test_y = self._features(trainer, pl_module, self.test, "test")
        correct = 0
        if len(test_x):
            scores = knn_predict(bank_x, bank_y, test_x, self.num_classes, self.k, self.temperature)
            correct = (scores.argmax(1) == test_y).sum().item()
        counts = torch.tensor([correct, len(test_x)], dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return 100.0 * (counts[0] / counts[1]).item()

    def _features(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Dataset, name: str
    ):
        """Features and labels of this process's shard (every world_size-th image)."""
        if name not in self._loaders:
            shard = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
            self._loaders[name] = feature_loader(
                shard, self.batch_size, self.num_workers, keep_workers=True
            )
        return encode(
            FrozenFeatures(pl_module.encoder_q, self.layer),
            self._loaders[name],
            pl_module.device,
            desc=f"kNN monitor: {name}" if trainer.is_global_zero else None,
            autocast=trainer.precision_plugin.forward_context,
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loaders.clear()  # their workers stop with them

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc) -> None:
        # A fit that ends on an exception (a stop signal's checkpoint-and-exit, a crash) gets no
        # teardown. Kept workers would then live to the interpreter's exit, which terminates
        # and joins them; they ignore SIGTERM (moco/data/workers.py), so it would wait for ever.
        self._loaders.clear()
