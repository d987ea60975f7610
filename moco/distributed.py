"""What MoCo needs across processes: gathered keys and shuffle-BN. Identity on one process.

Every helper works on a single process too (no process group, or a world of one), so the model
runs the same code on a laptop CPU and on many GPUs. All of them assume every rank holds a batch
of the same size, which the training data loader guarantees (``drop_last=True`` and Lightning's
``DistributedSampler``, which pads the data set to a multiple of the world size).

Why shuffle-BN and not SyncBatchNorm: SyncBN normalises the key batch with the statistics of the
whole global batch, which still contains the query's own positive sample, so the leak that
shuffle-BN exists to close (MoCo paper, Sec. 3.3) stays open. What closes it is that a sample's
key is normalised with *other* samples than its query, which is what the cross-rank shuffle does.
"""

import inspect

import torch
import torch.distributed as dist
from torch import nn

from moco.errors import ConfigError


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B x ...) of every rank along dim 0, in rank order (world*B x ...).

    No gradient flows back through the result: MoCo only gathers keys, which have none.
    """
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` for any picklable ``obj`` (``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on every process (a collective: every rank must call it)."""
    if world_size() == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``values`` over every process (a collective)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


@torch.no_grad()
def shuffle_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A random slice of the global batch for this rank, and the permutation to undo it.

    All ranks' batches are gathered (world*B rows, rank order); rank 0 draws one permutation of
    the global batch and broadcasts it, so every rank agrees; rank r keeps rows
    ``perm[r*B:(r+1)*B]``. With one process this is a plain shuffle of the batch.
    """
    batch = images.shape[0]
    everything = gather(images)  # world*B x ...
    perm = torch.randperm(everything.shape[0], device=images.device)  # world*B
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    mine = perm[rank() * batch : (rank() + 1) * batch]  # B
    return everything[mine], perm


@torch.no_grad()
def unshuffle_batch(encoded: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_batch`: rows of this rank's own samples, in their original order."""
    batch = encoded.shape[0]
    everything = gather(encoded)  # world*B x C; row j encodes global sample perm[j]
    back = torch.argsort(perm)  # global sample i sits in row back[i]
    return everything[back[rank() * batch : (rank() + 1) * batch]]


@torch.no_grad()
def encode_shuffled(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder(images)`` with the batch shuffled across ranks before the encoder, restored after.

    The key encoder's BatchNorm then normalises sample i together with samples other than the
    ones its query was normalised with: the BN statistics cannot tell which key matches which
    query. On one process, SplitBatchNorm provides the groups that separate GPUs would.
    Output rows are in the input's order.
    """
    shuffled, perm = shuffle_batch(images)
    return unshuffle_batch(encoder(shuffled), perm)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` (e.g. BatchNorm running statistics) from rank ``src``.

    Ranks see different batches, so their running statistics drift apart when DDP does not
    broadcast buffers; evaluation calls this first so that all ranks use one model.
    """
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def ddp_strategy(sync_buffers_every_step: bool = False, **kwargs):
    """Lightning's DDPStrategy for MoCo: by default without DDP's broadcast of rank 0's buffers
    before every forward.

    MoCo keeps its queue identical on every rank by gathering all ranks' keys; the broadcast
    would hide a missing gather and copy the whole queue (K x dim) every step. Buffers are still
    synced once when DDP wraps the model. BatchNorm running statistics then differ per rank; they
    only matter in evaluation, which takes rank 0's first (:func:`broadcast_buffers`).
    """
    from pytorch_lightning.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    # torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers (same meaning here).
    options = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    # Lightning hands the arguments it does not know to DDP, which would refuse a misspelt one
    # only once the processes have started, with a traceback on every rank.
    known = set(inspect.signature(DDPStrategy.__init__).parameters) | set(options)
    unknown = sorted(set(kwargs) - known - {"self", "kwargs"})
    if unknown:
        raise ConfigError(
            f"trainer.strategy.{unknown[0]} is not an argument of Lightning's DDPStrategy or of "
            "torch's DistributedDataParallel: check its spelling"
        )
    return DDPStrategy(**{name: sync_buffers_every_step}, **kwargs)
