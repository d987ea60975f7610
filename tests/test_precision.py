"""Training precision: bf16 autocast still trains, and fp32 training is the plain fp32 math.

precision=auto picks bf16-mixed only on CPUs with bf16 matrix instructions (moco/run/hardware.py),
so these tests force each precision rather than trusting what this machine would pick.
"""

from __future__ import annotations

import copy
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

TINY_STEPS = (
    "scheduler=constant",
    "model.momentum=0.9",
    "model.queue_size=32",
    "optimizer.lr=0.3",
)


class FixedPairs(Dataset):
    """Fixed image pairs: a noisy image and its noisy mirror image. A random network does not
    match the two (it is not mirror-invariant), a trained one learns to."""

    def __init__(self, n: int = 64, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, size, size, generator=g)
        self.a = images + 0.3 * torch.randn(images.shape, generator=g)
        self.b = images.flip(-1) + 0.3 * torch.randn(images.shape, generator=g)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), 0


class Record(pl.Callback):
    """The loss of every step and the dtypes the encoders' layers computed in."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module):
        def hook(module, inputs, output):
            self.dtypes.add(output.dtype)

        for module in pl_module.encoder_q.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.register_forward_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model, precision: str, steps: int) -> Record:
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    torch.manual_seed(0)
    trainer.fit(model, DataLoader(FixedPairs(), batch_size=8, shuffle=True, drop_last=True))
    return record


def test_bf16_autocast_trains_like_fp32(tiny_moco):
    """The MoCo loss of one batch against fixed negatives, minimised by SGD under bf16 autocast
    (what precision=bf16-mixed wraps around training_step), falls as it does in fp32."""
    data = FixedPairs(n=8)
    negatives = F.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)  # the same weights and shuffles for both
        model, _ = tiny_moco(*TINY_STEPS)
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
        curves[dtype] = []
        for _ in range(30):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss, _, _ = model.contrast(data.a, data.b, negatives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curves[dtype].append(float(loss))
    fp32, bf16 = curves[torch.float32], curves[torch.bfloat16]
    assert fp32[-1] < 0.6 * fp32[0], fp32  # the set-up is learnable...
    assert bf16[-1] < 0.6 * bf16[0], bf16  # ...and bf16 learns it too
    assert abs(bf16[0] - fp32[0]) < 0.05 * fp32[0]  # same model, same loss up to bf16 rounding


def test_bf16_mixed_trainer_runs_layers_in_bf16_and_keeps_fp32_weights(tiny_moco):
    model, _ = tiny_moco(*TINY_STEPS)
    initial = copy.deepcopy(model)
    record = fit(model, "bf16-mixed", steps=3)
    assert torch.bfloat16 in record.dtypes  # autocast really ran the layers in bf16
    assert all(map(math.isfinite, record.losses))
    # Parameters stay fp32 (mixed precision), so the momentum update is not done in bf16; and
    # training moved them.
    for encoder in ("encoder_q", "encoder_k"):
        params = dict(getattr(model, encoder).named_parameters())
        assert all(p.dtype == torch.float32 for p in params.values())
        before = dict(getattr(initial, encoder).named_parameters())
        assert any(not torch.equal(params[n], before[n]) for n in params)


def test_fp32_training_is_plain_fp32_math(tiny_moco):
    """The Trainer's 32-true path gives bit for bit what hand-written fp32 steps give: no
    autocast, no cast, nothing the precision plumbing adds."""
    model, cfg = tiny_moco(*TINY_STEPS)
    reference = type(model)(**model.hparams)
    reference.load_state_dict(model.state_dict())

    record = fit(model, "32-true", steps=4)
    assert record.dtypes == {torch.float32}

    # By hand: the module's training_step, backward and torch SGD with the scaled lr.
    lr = cfg.optimizer.lr * cfg.data.batch_size / cfg.model.lr_reference_batch
    optimizer = torch.optim.SGD(
        reference.encoder_q.parameters(),
        lr=lr,
        momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay,
    )
    torch.manual_seed(0)
    loader = DataLoader(FixedPairs(), batch_size=8, shuffle=True, drop_last=True)
    losses, step = [], 0
    reference.train()
    while step < 4:
        for batch in loader:
            if step == 4:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = reference.training_step(batch, step)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            step += 1
    assert losses == record.losses
    for (name, trained), (_, by_hand) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(trained, by_hand), name
