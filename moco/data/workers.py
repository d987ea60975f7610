"""How every DataLoader of the project starts its worker processes.

The rules, kept here so that the training loader, the kNN monitor and the evaluation loaders
follow them alike:

- **Spawned, not forked, under torch.distributed.** A process group runs threads of its own
  (gloo's transport, the store's client). A worker forked while one of them holds a lock starts
  with that lock held and nobody to release it: it then hangs inside ``fork`` or dies, and the
  collective of the next step waits on the other ranks for ever. A spawned worker is a fresh
  interpreter and inherits no locks. Outside a process group the platform's default (fork on
  Linux) is kept: it starts in milliseconds where a spawn re-imports the program.
- **The stop signals belong to the training process.** A cluster's scheduler sends SIGTERM or
  SIGUSR1 to every process of the job; the training process then writes a checkpoint between two
  steps and stops its workers itself (moco/run/within_epoch.py). A worker that died of the signal
  would end the run with the loader's error first. A worker ignores them from ``worker_init_fn``
  on, and a spawned one is started with them blocked so that a signal arriving while it imports
  the program is not its death either.
- **Loaders read every epoch keep their workers** (``keep``): a spawn costs seconds, once per
  run is enough. Nothing random lives in a worker (each sample carries its seed,
  moco/data/sampler.py), so a kept worker holds no state a resumed run would lack.
"""

import multiprocessing.context
import signal

import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_stop_signals_to_training(worker_id: int) -> None:
    """``worker_init_fn``: ignore the stop signals, then let them through (any that came while
    they were blocked is dropped: it was meant for the training process, which has it too)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _SpawnWithStopSignalsBlocked(multiprocessing.context.SpawnProcess):
    """A spawned process whose stop signals are blocked from its first instruction: the mask of
    the thread that starts it survives fork and exec."""

    @staticmethod
    def _Popen(process_obj):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnWithStopSignalsBlocked


def worker_start_method() -> multiprocessing.context.BaseContext | None:
    """The ``multiprocessing_context`` of a loader's workers: see the module's docstring."""
    if dist.is_available() and dist.is_initialized():
        return _SpawnContext()
    return None


def loader_workers(num_workers: int, keep: bool = False) -> dict:
    """DataLoader keyword arguments for ``num_workers`` worker processes (0: none, the batches
    are made in the calling process). ``keep`` keeps them from one pass over the loader to the
    next, for a loader read every epoch: a spawned worker takes seconds to start."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {
        "num_workers": num_workers,
        "multiprocessing_context": worker_start_method(),
        "worker_init_fn": leave_stop_signals_to_training,
        "persistent_workers": keep,
    }
