"""What the launcher (torchrun or SLURM's srun) tells each process, as OmegaConf resolvers.

With torchrun or srun every process runs the whole script, Hydra included, before any process
group exists. Left alone, each would name its run directory after its own start time (several
directories for one run) and write Hydra's files there. These resolvers, used in
``conf/pretrain.yaml`` and ``conf/trainer/ddp.yaml``, give every process of one launch the same
run directory, let only rank 0 write Hydra's config files, and size the Lightning Trainer from
the launcher's own numbers. (When Lightning itself starts the processes, it passes the run
directory to its children on the command line, and these resolvers see a single process.)
"""

import os
from datetime import datetime


def launched_world_size() -> int:
    """Processes started by torchrun or srun for this run; 1 for a plain ``python`` start."""
    for variable in ("WORLD_SIZE", "SLURM_NTASKS"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 1


def launched_rank() -> int:
    for variable in ("RANK", "SLURM_PROCID"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def slurm_job() -> str | None:
    """The SLURM job of a process started by srun (``<array job>_<task>`` in a job array), or
    None. A requeued job keeps its id, and so its run directory."""
    env = os.environ
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" not in env:  # salloc's shell: not srun
        return None
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def _torchrun_id() -> str:
    """An id that every process of one torchrun launch shares and a later launch does not."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and env["TORCHELASTIC_RUN_ID"] != "none":
        return "torchrun-" + env["TORCHELASTIC_RUN_ID"][:8]  # --standalone: a random id
    # torchrun without --rdzv-id: only the rendezvous port tells launches apart.
    return f"torchrun-port{env.get('MASTER_PORT', '0')}"


def run_stamp() -> str:
    """Name of the run directory: the SLURM job under srun (the same after a requeue, which
    then resumes there), the day and the launch id under torchrun, else the start time."""
    job = slurm_job()
    if job is not None:
        return f"slurm-{job}"
    if launched_world_size() > 1:
        return f"{datetime.now():%Y-%m-%d}_{_torchrun_id()}"
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}"


def hydra_subdir() -> str | None:
    """Hydra's ``output_subdir``: written by rank 0 only."""
    return ".hydra" if launched_rank() == 0 else None


def launched_devices(default: str | int = "auto") -> str | int:
    """Processes per node: the Trainer's ``devices`` must match what the launcher started."""
    for variable in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if variable in os.environ:
            return int(os.environ[variable].split("(")[0])  # SLURM may say "2(x3)"
    return default


def launched_nodes(default: int = 1) -> int:
    if "LOCAL_WORLD_SIZE" in os.environ:
        return launched_world_size() // int(os.environ["LOCAL_WORLD_SIZE"])
    if "SLURM_NNODES" in os.environ:
        return int(os.environ["SLURM_NNODES"])
    return default
