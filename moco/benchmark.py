"""Training-speed benchmark: how far MoCo's training step is from the compute floor.

Four measurements on the same backbone, image size, batch and precision:

``floor``     the compute floor: the model's two encoders on synthetic tensors, query forward +
              backward + optimizer step, key forward; no queue, no momentum, no shuffle.
``moco``      our LightningModule's real ``training_step`` on the same tensors, outside the
              Trainer, plus backward and optimizer step: only MoCo's own work differs from 1.
``official``  a plain-PyTorch MoCo step in fp32 and NCHW, written here the way the official
              implementation (facebookresearch/moco) does it: momentum update in a Python loop
              over parameters, a clone of the queue for the negatives, einsum + concat logits,
              enqueue at a pointer. The baseline a user would otherwise run.
``loop``      the full pretraining loop: Lightning's Trainer, the project's data module with two
              augmented views and ``data.num_workers`` workers (``loop_w<n>``: n workers).

Optional: ``moco_noclone`` (the module's pieces without the per-step queue copy, enqueue after
backward), ``moco_compiled`` (encoders under ``torch.compile``), ``floor_nchw`` (the floor
without channels_last, to compare both in one process), ``levers`` (micro-timings of the
momentum update, the queue copy and the loss).

Images per second are the batch over the median step time after warm-up; the CPU time of the
process's threads per step (user, system) is recorded too, as it moves much less than wall time
with the load of other jobs. Peak memory is peak resident set size (RSS) on CPU and
``torch.cuda.max_memory_allocated`` on GPU; how it was measured is stored next to every number
(``memory_method``). With ``isolate=True`` (the script's default) every measurement runs in a
fresh process and reports its ``ru_maxrss``, so no measurement inherits another's memory. With
``interleave=True`` the step variants run in one process, a step of each in turn
(:func:`measure_interleaved`): on a shared machine only that makes their ratios fair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from moco.hardware import configure_malloc

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MAIN_VARIANTS = ("floor", "moco", "official", "loop")
EXTRA_VARIANTS = ("moco_noclone", "moco_compiled", "floor_nchw", "levers")
_LOOP = re.compile(r"^loop(?:_w(\d+))?$")
_RESULT_TAG = "BENCHMARK_RESULT "


@dataclasses.dataclass
class Settings:
    """One benchmark case. ``None`` means: as the composed config (conf/) says."""

    backbone: str = "resnet18"
    data: str = "fashion_mnist"
    image_size: int | None = None
    channels: int | None = None
    batch: int = 256
    queue_size: int = 65536
    dim: int | None = None
    bn_splits: int | None = None
    precision: str = "32"  # or bf16-mixed, auto
    channels_last: bool = True
    threads: int = 0  # torch intra-op threads; 0: torch's default
    warmup: int = 3
    steps: int = 5
    device: str = "cpu"
    malloc: str = "no-mmap"  # as pretraining sets it (conf/pretrain.yaml); or default
    stem: str = "small"  # backbone.stem; the data set's recipe is not applied (recipe=none)
    overrides: tuple[str, ...] = ()  # further Hydra overrides, e.g. data.num_train=64

    def label(self) -> str:
        threads = self.threads or torch.get_num_threads()
        return (
            f"{self.backbone} ({self.stem} stem) {self.data} batch {self.batch} "
            f"K {self.queue_size} "
            f"precision {self.precision} channels_last {'on' if self.channels_last else 'off'} "
            f"threads {threads} malloc {self.malloc}"
        )


def validate_variant(name: str) -> str:
    if name in MAIN_VARIANTS or name in EXTRA_VARIANTS or _LOOP.match(name):
        return name
    raise ValueError(
        f"unknown variant {name!r}: use {', '.join(MAIN_VARIANTS + EXTRA_VARIANTS)} or loop_w<n>"
    )


# ------------------------------------------------------------------------------- configuration
def compose(settings: Settings, num_workers: int | None = None):
    """The ``pretrain`` config (+experiment=moco_v2) for ``settings``, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import moco  # noqa: F401  (registers the resolvers conf/ uses)
    from moco.config import validate_pretrain

    s = settings
    overrides = [
        "+experiment=moco_v2",
        f"data={s.data}",
        f"backbone={s.backbone}",
        "recipe=none",  # the benchmark's own settings, not a data set's tuned ones
        f"backbone.stem={s.stem}",
        f"data.batch_size={s.batch}",
        f"model.queue_size={s.queue_size}",
        f"model.channels_last={str(s.channels_last).lower()}",
        f"trainer.precision={s.precision}",
        f"trainer.accelerator={s.device}",
        "eval.enabled=false",
    ]
    optional = {
        "data.image_size": s.image_size,
        "data.channels": s.channels,
        "model.dim": s.dim,
        "model.bn_splits": s.bn_splits,
        "data.num_workers": num_workers,
    }
    overrides += [f"{key}={value}" for key, value in optional.items() if value is not None]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="pretrain", overrides=[*overrides, *s.overrides])
    validate_pretrain(cfg)
    return cfg


def _precision(cfg) -> str:
    from moco.hardware import resolve_precision

    return resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)


def _autocast(cfg) -> contextlib.AbstractContextManager:
    """What Lightning's mixed-precision plugin does around training_step; nothing for fp32."""
    precision = _precision(cfg)
    if precision.endswith("-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device_type=cfg.trainer.accelerator, dtype=dtype)
    return contextlib.nullcontext()


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    """The configured optimizer with the lr scaled by the batch, as MoCo.configure_optimizers."""
    import hydra

    lr = cfg.optimizer.lr * cfg.data.batch_size / cfg.model.lr_reference_batch
    return hydra.utils.instantiate(cfg.optimizer, params=params, lr=lr)


def _synthetic_views(cfg, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def _build_moco(cfg, device: str):
    import hydra

    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model).to(device).train()


# ---------------------------------------------------------------------------------- memory
def _configure_malloc(mode: str) -> None:
    if not configure_malloc(mode) and mode != "default":
        raise RuntimeError(f"malloc={mode} needs glibc's mallopt, which this system lacks")


class PeakMemory:
    """Peak memory of the code inside ``with``: GPU allocations, or the process's peak RSS.

    On CPU the peak RSS of the process is reset to the current RSS at entry where Linux allows
    it (/proc/self/clear_refs), so the peak covers this measurement only (plus whatever earlier
    work left resident); otherwise it is the process's lifetime peak (``ru_maxrss``), which is
    exact in a fresh process per measurement.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = ""
        self.peak_mb = math.nan
        self.start_mb = math.nan

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.start_mb = _proc_status_mb("VmRSS")
            self.method = "peak RSS (VmHWM after /proc/self/clear_refs reset)"
        else:
            self.start_mb = _proc_status_mb("VmRSS")
            self.method = "peak RSS of the process (ru_maxrss)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif "VmHWM" in self.method:
            self.peak_mb = _proc_status_mb("VmHWM")
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return math.nan


# --------------------------------------------------------------------------------- timing
def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


class _Clock:
    """Wall time, and CPU time of all threads of this process (user, system), of a block.

    On a machine shared with other jobs the wall time of a step swings with their load; the
    system time (page faults, zeroing fresh memory) does much less, and shows what the
    allocator costs.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall = self.user = self.sys = 0.0

    def __enter__(self) -> _Clock:
        start = _now(self.device)
        t = os.times()
        self.wall, self.user, self.sys = start, t.user, t.system
        return self

    def __exit__(self, *exc) -> None:
        end = _now(self.device)
        t = os.times()
        self.wall, self.user, self.sys = end - self.wall, t.user - self.user, t.system - self.sys


def _time_steps(step: Callable[[int], None], warmup: int, steps: int, device: str) -> list[_Clock]:
    """Wall and CPU seconds of each of ``warmup + steps`` calls of ``step``."""
    clocks = []
    for i in range(warmup + steps):
        with _Clock(device) as clock:
            step(i)
        clocks.append(clock)
    return clocks


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No Lightning banners or 'self.log outside the Trainer' warnings in the benchmark output."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ------------------------------------------------------------------------------- variants
def _floor_step(cfg, device: str):
    """Bare encoders: query forward + backward + optimizer step, key forward."""
    model = _build_moco(cfg, device)
    encoder_q, encoder_k = model.encoder_q, model.encoder_k
    optimizer = _optimizer(cfg, encoder_q.parameters())
    view_q, view_k = _synthetic_views(cfg, device)

    def step(_: int) -> None:
        with _autocast(cfg):
            q = encoder_q(view_q)  # N x dim
            with torch.no_grad():
                encoder_k(view_k)
            loss = q.float().square().mean()  # any scalar: backward costs the same
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _moco_step(cfg, device: str, compiled: bool = False):
    """The LightningModule's own training_step, then backward and optimizer step."""
    model = _build_moco(cfg, device)
    if compiled:
        model.encoder_q = torch.compile(model.encoder_q)
        model.encoder_k = torch.compile(model.encoder_k)
    optimizer = _optimizer(cfg, model.encoder_q.parameters())
    batch = (_synthetic_views(cfg, device), torch.zeros(cfg.data.batch_size, dtype=torch.long))

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cfg):
            loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()

    return step


def _moco_noclone_step(cfg, device: str):
    """As ``moco`` but the negatives are the queue buffer itself, enqueued after backward."""
    from moco.losses import contrastive_top1
    from moco.momentum import momentum_update

    model = _build_moco(cfg, device)
    optimizer = _optimizer(cfg, model.encoder_q.parameters())
    view_q, view_k = _synthetic_views(cfg, device)

    def step(_: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cfg):
            momentum_update(model.encoder_q, model.encoder_k, cfg.model.momentum)
            loss, logits, keys = model._contrast(view_q, view_k, model.queue.keys)
            model._stop_if_not_finite(loss)  # what training_step does besides, for a fair A/B
            contrastive_top1(logits)
        loss.backward()
        optimizer.step()
        model.queue.enqueue(keys)  # after backward: the logits no longer need the old buffer

    return step


class OfficialStyleMoCo:
    """MoCo as the official implementation writes it, on one device, in fp32 and NCHW.

    Same backbone and head as ours (including SplitBatchNorm, as the official CIFAR demo uses on
    one GPU), so that only the MoCo bookkeeping and the memory format differ from ``moco``.
    """

    def __init__(self, cfg, device: str) -> None:
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


def _official_step(cfg, device: str):
    moco = OfficialStyleMoCo(cfg, device)
    optimizer = _optimizer(cfg, moco.encoder_q.parameters())
    view_q, view_k = _synthetic_views(cfg, device)

    def step(_: int) -> None:
        loss = moco.forward(view_q, view_k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _measure_step(cfg, settings: Settings, make_step: Callable) -> dict:
    device = settings.device
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        step = make_step(cfg, device)
        setup_s = time.perf_counter() - start
        times = _time_steps(step, settings.warmup, settings.steps, device)
    return _result(cfg, settings, times, memory, setup_s=setup_s)


def _measure_loop(cfg, settings: Settings) -> dict:
    """Lightning's fit on the real data module, for ``warmup + steps`` optimizer steps."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from moco.data import PretrainDataModule

    class StepTimer(pl.Callback):
        """Time between the ends of consecutive batches (data wait included); CPU time of the
        main process only (data-loader workers are other processes)."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, float, float]] = []

        def _mark(self) -> None:
            t = os.times()
            self.marks.append((_now(settings.device), t.user, t.system))

        def on_train_start(self, trainer, pl_module) -> None:
            self._mark()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._mark()

    timer = StepTimer()
    with PeakMemory(settings.device) as memory, tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pl.seed_everything(0, workers=True, verbose=False)
        datamodule = PretrainDataModule(cfg.data, cfg.augment)
        datamodule.setup("fit")
        model = _build_moco(cfg, "cpu")
        trainer = pl.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=1,
            precision=_precision(cfg),
            max_steps=settings.warmup + settings.steps,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            logger=CSVLogger(tmp, name="", version="logs"),
            default_root_dir=tmp,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        setup_s = time.perf_counter() - start
        trainer.fit(model, datamodule=datamodule)
    times = []
    for a, b in zip(timer.marks, timer.marks[1:]):  # noqa: B905
        clock = _Clock(settings.device)
        clock.wall, clock.user, clock.sys = (b[i] - a[i] for i in range(3))
        times.append(clock)
    result = _result(cfg, settings, times, memory, setup_s=setup_s)
    result["num_workers"] = cfg.data.num_workers
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["largest_child_peak_rss_mb"] = workers_kib / 1024 if cfg.data.num_workers else 0.0
    return result


def _result(cfg, settings: Settings, clocks: list[_Clock], memory: PeakMemory, **extra) -> dict:
    measured = clocks[settings.warmup :]
    median = statistics.median(c.wall for c in measured)
    return {
        "images_per_s": cfg.data.batch_size / median,
        "median_step_s": median,
        "step_s": [c.wall for c in measured],
        "cpu_user_s": [c.user for c in measured],
        "cpu_sys_s": [c.sys for c in measured],
        "warmup_step_s": [c.wall for c in clocks[: settings.warmup]],
        "peak_memory_mb": memory.peak_mb,
        "memory_at_start_mb": memory.start_mb,
        "memory_method": memory.method,
        "precision": _precision(cfg),
        "threads": torch.get_num_threads(),
        **extra,
    }


# --------------------------------------------------------------------------------- levers
def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def info_nce_divided_logits(q, k, negatives, temperature):
    """The official formulation: the N x (1+K) logits are divided by T (for comparison)."""
    pos = (q * k.detach()).sum(dim=1, keepdim=True)  # N x 1
    neg = q @ negatives.detach().T  # N x K
    logits = torch.cat([pos, neg], dim=1) / temperature  # N x (1+K)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), logits


def _measure_levers(cfg, settings: Settings, repeats: int = 15) -> dict:
    """Milliseconds per call of the pieces a MoCo step adds to the floor, and alternatives."""
    from moco.losses import contrastive_top1, info_nce
    from moco.momentum import momentum_update

    device, m = settings.device, cfg.model.momentum
    model = _build_moco(cfg, device)
    q_params = list(model.encoder_q.parameters())
    k_params = list(model.encoder_k.parameters())

    @torch.no_grad()
    def loop_out_of_place() -> None:  # the official implementation
        for p_q, p_k in zip(q_params, k_params):  # noqa: B905
            p_k.data = p_k.data * m + p_q.data * (1.0 - m)

    @torch.no_grad()
    def loop_in_place() -> None:
        for p_q, p_k in zip(q_params, k_params):  # noqa: B905
            p_k.mul_(m).add_(p_q, alpha=1.0 - m)

    n, dim = cfg.data.batch_size, cfg.model.dim
    q = F.normalize(torch.randn(n, dim, device=device), dim=1).requires_grad_()
    k = F.normalize(torch.randn(n, dim, device=device), dim=1)
    keys = model.queue.keys
    temperature = cfg.model.temperature
    logits = info_nce(q, k, keys, temperature)[1].detach()  # N x (1+K)

    def loss_fwd_bwd(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            q.grad = None
            loss, _ = fn(q, k, keys, temperature)
            loss.backward()

        return run

    candidates = {
        "momentum_foreach_lerp (ours)": lambda: momentum_update(
            model.encoder_q, model.encoder_k, m
        ),
        "momentum_python_loop_out_of_place (official)": loop_out_of_place,
        "momentum_python_loop_in_place": loop_in_place,
        "queue_clone (ours and official, per step)": keys.clone,
        "contrastive_top1 on the logits (ours, per step)": lambda: contrastive_top1(logits),
        "info_nce_fwd_bwd (moco.losses)": loss_fwd_bwd(info_nce),
        "info_nce_fwd_bwd, logits divided by T (official)": loss_fwd_bwd(info_nce_divided_logits),
    }
    # Interleaved rounds, so that load from other jobs hits every candidate alike.
    rounds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(3):
        for name, fn in candidates.items():
            rounds[name].append(_median_ms(fn, repeats))
    return {
        "ms": {name: statistics.median(v) for name, v in rounds.items()},
        "queue_mb": keys.numel() * keys.element_size() / 2**20,
        "logits_mb": n * (1 + keys.shape[0]) * 4 / 2**20,
        "parameter_tensors": len(q_params),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- measurement
STEP_MAKERS: dict[str, Callable] = {
    "floor": _floor_step,
    "moco": _moco_step,
    "moco_noclone": _moco_noclone_step,
    "moco_compiled": lambda cfg, device: _moco_step(cfg, device, compiled=True),
    "official": _official_step,
    "floor_nchw": lambda cfg, device: _floor_step(_with(cfg, "model.channels_last=false"), device),
}


def _with(cfg, *dotlist: str):
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotlist)))


def measure_interleaved(variants: list[str], settings: Settings) -> dict[str, dict]:
    """The step variants in one process, one step of each in turn (the order rotating).

    On a machine shared with other jobs the load changes within minutes (here a step took 8.5 s
    or 18 s depending on it), so variants measured one after the other can differ by 2x for no
    reason of their own; taken in turn, step by step, they share the load alike. Memory is then
    the largest rise of the process's RSS during one step over its RSS before the step: what
    the step itself allocates (peak RSS would include the other variants' models).
    """
    for v in variants:
        if v not in STEP_MAKERS:
            raise ValueError(f"{v} cannot be interleaved: only {', '.join(STEP_MAKERS)}")
    cfg = compose(settings)
    _configure_malloc(settings.malloc)
    device = settings.device
    with _threads(settings.threads), _quiet():
        steps = {v: STEP_MAKERS[v](cfg, device) for v in variants}
        times: dict[str, list[_Clock]] = {v: [] for v in variants}
        rises: dict[str, list[float]] = {v: [] for v in variants}
        method = ""
        for i in range(settings.warmup + settings.steps):
            shift = i % len(variants)
            for v in variants[shift:] + variants[:shift]:
                with PeakMemory(device) as memory, _Clock(device) as clock:
                    steps[v](i)
                times[v].append(clock)
                rises[v].append(memory.peak_mb - memory.start_mb)
                method = memory.method
        results = {}
        for v in variants:
            results[v] = _result(cfg, settings, times[v], memory)
            lifetime = "ru_maxrss" in method  # no reset possible: a rise says nothing
            results[v].update(
                peak_memory_mb=math.nan if lifetime else max(rises[v]),
                memory_at_start_mb=math.nan,
                memory_method=f"interleaved: largest rise during one step of {method}",
                interleaved_with=variants,
            )
    return results


def measure(variant: str, settings: Settings) -> dict:
    """Run one measurement in this process."""
    validate_variant(variant)
    loop = _LOOP.match(variant)
    workers = int(loop.group(1)) if loop and loop.group(1) is not None else None
    cfg = compose(settings, num_workers=workers)
    _configure_malloc(settings.malloc)
    with _threads(settings.threads), _quiet():
        if loop:
            return _measure_loop(cfg, settings)
        if variant == "levers":
            return _measure_levers(cfg, settings)
        return _measure_step(cfg, settings, STEP_MAKERS[variant])


def measure_isolated(variant: str | list[str], settings: Settings) -> dict:
    """Run one measurement (a list: interleaved) in a fresh Python process, so that its peak
    RSS is its own."""
    payload = json.dumps({"variant": variant, "settings": dataclasses.asdict(settings)})
    env = dict(os.environ)
    if settings.threads > 0:  # also the OpenMP pool size, before torch starts it
        env["OMP_NUM_THREADS"] = str(settings.threads)
    proc = subprocess.run(
        [sys.executable, "-m", "moco.benchmark", payload],
        capture_output=True,
        text=True,
        env=env,
        cwd=CONF_DIR.parent,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    raise RuntimeError(
        f"benchmark {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def run(
    cases: list[Settings],
    variants: list[str],
    isolate: bool = True,
    rounds: int = 1,
    interleave: bool = False,
    report: Callable[[str], None] = print,
) -> dict:
    """Every variant of every case, all of them ``rounds`` times in turn (so that load from
    other jobs spreads over all alike); returns the JSON-ready results with the ratios.

    ``interleave``: the step variants (floor, moco, official, ...) of a case run in one process,
    a step of each in turn (:func:`measure_interleaved`); the others as usual.
    """
    for v in variants:
        validate_variant(v)
    for settings in cases:  # a user mistake ends here, before any measurement
        for variant in variants:
            loop = _LOOP.match(variant)
            compose(settings, int(loop.group(1)) if loop and loop.group(1) else None)
    group = [v for v in variants if v in STEP_MAKERS] if interleave else []
    jobs: list[str | list[str]] = ([group] if group else []) + [
        v for v in variants if v not in group
    ]
    out = {"machine": machine_info(), "isolated": isolate, "rounds": rounds, "cases": []}
    out["interleaved"] = group
    per_round: list[dict[str, list[dict]]] = [{v: [] for v in variants} for _ in cases]
    for r in range(rounds):  # cases and variants in turn, so that they share the load alike
        for settings, measured in zip(cases, per_round, strict=True):
            for job in jobs:
                name = " + ".join(job) if isinstance(job, list) else job
                report(f"  round {r + 1}/{rounds}: {name} ({settings.label()}) ...")
                start = time.perf_counter()
                if isolate:
                    result = measure_isolated(job, settings)
                elif isinstance(job, list):
                    result = measure_interleaved(job, settings)
                else:
                    result = measure(job, settings)
                wall = time.perf_counter() - start
                for v, res in result.items() if isinstance(job, list) else [(job, result)]:
                    measured[v].append({**res, "wall_s": wall})
    for settings, measured in zip(cases, per_round, strict=True):
        results = {v: merge_rounds(measured[v], settings) for v in variants}
        case = {"settings": dataclasses.asdict(settings), "results": results}
        case["ratios"] = ratios(results)
        out["cases"].append(case)
        report(format_table(settings, results, case["ratios"], rounds))
    return out


def merge_rounds(results: list[dict], settings: Settings) -> dict:
    """One result from several rounds: the median over all timed steps, the largest peak."""
    if "ms" in results[0]:  # levers: the median of each candidate's per-round medians
        ms = {n: statistics.median(r["ms"][n] for r in results) for n in results[0]["ms"]}
        return {**results[0], "ms": ms}
    steps = [t for r in results for t in r["step_s"]]
    median = statistics.median(steps)
    merged = dict(results[0])
    merged.update(
        images_per_s=settings.batch / median,
        median_step_s=median,
        best_step_s=min(steps),
        step_s=steps,
        cpu_user_s=[t for r in results for t in r["cpu_user_s"]],
        cpu_sys_s=[t for r in results for t in r["cpu_sys_s"]],
        round_median_step_s=[r["median_step_s"] for r in results],
        warmup_step_s=[t for r in results for t in r["warmup_step_s"]],
        peak_memory_mb=max(r["peak_memory_mb"] for r in results),
        wall_s=sum(r["wall_s"] for r in results),
    )
    return merged


def ratios(results: dict) -> dict:
    """Throughput ratios: moco/floor, moco/official and loop/floor (per loop variant)."""

    def ips(name: str) -> float | None:
        r = results.get(name)
        return r["images_per_s"] if r and "images_per_s" in r else None

    out = {}
    pairs = [("moco", "floor"), ("moco", "official")]
    pairs += [(name, "floor") for name in results if _LOOP.match(name)]
    pairs += [(name, "moco") for name in ("moco_noclone", "moco_compiled") if name in results]
    pairs += [("floor", "floor_nchw")]
    for a, b in pairs:
        if ips(a) and ips(b):
            out[f"{a}/{b}"] = ips(a) / ips(b)
    return out


def _median_cpu(result: dict, *kinds: str) -> float:
    """Median over the timed steps of their CPU seconds of ``kinds`` (user, sys) summed."""
    per_step = zip(*(result.get(f"cpu_{k}_s", [math.nan]) for k in kinds), strict=True)
    return statistics.median(sum(parts) for parts in per_step)


def format_table(settings: Settings, results: dict, ratio: dict, rounds: int = 1) -> str:
    lines = [
        f"{settings.label()}; median over {rounds} round(s) x {settings.steps} steps, each after "
        f"{settings.warmup} warm-up steps",
        f"{'variant':<16}{'img/s':>9}{'s/step':>9}{'best s':>9}{'cpu s':>8}{'sys s':>8}"
        f"{'mem MB':>10}  notes",
    ]
    for name, r in results.items():
        if "images_per_s" not in r:
            continue
        notes = [r["precision"]]
        if "num_workers" in r:
            notes.append(f"{r['num_workers']} workers")
        if name in ("official",):
            notes[-1:] = ["fp32 NCHW"]
        if name == "moco_compiled":
            notes.append(f"first step {r['warmup_step_s'][0]:.0f} s (compile)")
        lines.append(
            f"{name:<16}{r['images_per_s']:>9.1f}{r['median_step_s']:>9.3f}"
            f"{r.get('best_step_s', min(r['step_s'])):>9.3f}"
            f"{_median_cpu(r, 'user', 'sys'):>8.2f}{_median_cpu(r, 'sys'):>8.2f}"
            f"{r['peak_memory_mb']:>10.0f}  {', '.join(notes)}"
        )
    lines.append("ratios (throughput): " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    lines.append("cpu s / sys s: CPU seconds of all threads per step, user+system / system only")
    methods = {r["memory_method"] for r in results.values() if "memory_method" in r}
    if methods:
        lines.append("peak memory: " + "; ".join(sorted(methods)))
    if "levers" in results:
        lev = results["levers"]
        lines.append(
            f"levers (ms per call, median; queue {lev['queue_mb']:.0f} MB, "
            f"logits {lev['logits_mb']:.0f} MB, {lev['parameter_tensors']} parameter tensors):"
        )
        lines += [f"  {name:<50}{ms:>9.2f}" for name, ms in lev["ms"].items()]
    return "\n".join(lines)


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "default_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _child(payload: str) -> None:
    request = json.loads(payload)
    settings = request["settings"]
    settings["overrides"] = tuple(settings["overrides"])
    if isinstance(request["variant"], list):
        results = measure_interleaved(request["variant"], Settings(**settings))
        print(_RESULT_TAG + json.dumps(results), flush=True)
        return
    result = measure(request["variant"], Settings(**settings))
    result["peak_rss_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not request["settings"]["device"].startswith("cuda") and "peak_memory_mb" in result:
        # A fresh process: its lifetime peak is this measurement's peak.
        result["peak_memory_mb"] = result["peak_rss_process_mb"]
        result["memory_method"] = "peak RSS of a fresh process (ru_maxrss)"
    print(_RESULT_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
