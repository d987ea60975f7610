"""Training-speed benchmark: how far MoCo's training step is from the compute floor.

Four measurements on the same backbone, image size, batch and precision:

``floor``     the compute floor: the model's two encoders on synthetic tensors, query forward +
              backward + optimizer step, key forward; no queue, no momentum, no shuffle.
``moco``      our LightningModule's real ``training_step`` on the same tensors, outside the
              Trainer, plus backward and optimizer step: only MoCo's own work differs from 1.
``official``  a plain-PyTorch MoCo step in fp32 and NCHW, written (``official.py``) the way the
              official implementation (facebookresearch/moco) does it: momentum update in a
              Python loop over parameters, a clone of the queue for the negatives, einsum +
              concat logits, enqueue at a pointer. The baseline a user would otherwise run.
``loop``      the full pretraining loop: Lightning's Trainer, the project's data module with two
              augmented views and ``data.num_workers`` workers (``loop_w<n>``: n workers).

Optional: ``moco_noclone`` (the module's pieces without the per-step queue copy, enqueue after
backward), ``moco_compiled`` (encoders under ``torch.compile``), ``floor_nchw`` (the floor
without channels_last, to compare both in one process), ``floor_plain_convs`` (the floor with
plain 3x3 convolutions, without ``moco.small_map_conv``), ``levers`` (micro-timings of the
momentum update, the queue copy and the loss).

Images per second are the batch over the median step time after warm-up; the CPU time of the
process's threads per step (user, system) is recorded too, as it moves much less than wall time
with the load of other jobs. Peak memory is peak resident set size (RSS) on CPU and
``torch.cuda.max_memory_allocated`` on GPU; how it was measured is stored next to every number
(``memory_method``). With ``isolate=True`` (the script's default) every measurement runs in a
fresh process and reports its ``ru_maxrss``, so no measurement inherits another's memory. With
``interleave=True`` the step variants run in one process, a step of each in turn
(:func:`measure_interleaved`): on a shared machine only that makes their ratios fair.

The modules, one concern each: ``settings`` (a case, the variant names, the composed config),
``workload`` (model, optimizer, precision and views from that config), ``steps`` (the step
variants), ``official`` (the official-style baseline), ``loop`` and ``levers`` (the other
variants), ``timing``, ``memory`` and ``record`` (what one measurement records), ``measure``
(a measurement in this process, alone or interleaved), ``isolated`` (in a fresh process, with
``__main__`` as the child), ``report`` (merged rounds, ratios, the table) and ``runner``
(:func:`run`, the whole benchmark). ``scripts/benchmark.py`` is its command line.
"""

from moco.tools.benchmark.isolated import measure_isolated
from moco.tools.benchmark.measure import measure, measure_interleaved
from moco.tools.benchmark.official import OfficialStyleMoCo
from moco.tools.benchmark.report import format_table, machine_info, merge_rounds, ratios
from moco.tools.benchmark.runner import run
from moco.tools.benchmark.settings import (
    EXTRA_VARIANTS,
    MAIN_VARIANTS,
    Settings,
    compose,
    validate_variant,
)
from moco.tools.benchmark.steps import STEP_MAKERS

__all__ = [
    "EXTRA_VARIANTS",
    "MAIN_VARIANTS",
    "STEP_MAKERS",
    "OfficialStyleMoCo",
    "Settings",
    "compose",
    "format_table",
    "machine_info",
    "measure",
    "measure_interleaved",
    "measure_isolated",
    "merge_rounds",
    "ratios",
    "run",
    "validate_variant",
]
