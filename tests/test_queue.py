"""KeyQueue: a fixed-size FIFO ring buffer of keys, saved with the module."""

from __future__ import annotations

import pytest
import torch

from moco.queue import KeyQueue


def distinct_keys(batch: int, dim: int, start: float) -> torch.Tensor:
    """Rows that are easy to tell apart: row i is filled with ``start + i``."""
    return (start + torch.arange(batch, dtype=torch.float32)).unsqueeze(1).repeat(1, dim)


def test_fifo_order_over_several_enqueues():
    queue = KeyQueue(size=10, dim=3)
    a, b, c = distinct_keys(3, 3, 100), distinct_keys(4, 3, 200), distinct_keys(2, 3, 300)
    initial = queue.keys.clone()
    queue.enqueue(a)
    queue.enqueue(b)
    queue.enqueue(c)
    assert torch.equal(queue.keys[0:3], a)
    assert torch.equal(queue.keys[3:7], b)
    assert torch.equal(queue.keys[7:9], c)
    # The one row never written keeps its initial value.
    assert torch.equal(queue.keys[9], initial[9])
    assert int(queue.ptr) == 9


def test_wrap_around_writes_tail_then_head_in_order():
    queue = KeyQueue(size=8, dim=2)
    queue.enqueue(distinct_keys(6, 2, 0))  # ptr -> 6
    before = queue.keys.clone()
    batch = distinct_keys(5, 2, 50)  # crosses the end: rows 6, 7, then 0, 1, 2
    queue.enqueue(batch)
    expected = before.clone()
    expected[6] = batch[0]
    expected[7] = batch[1]
    expected[0] = batch[2]
    expected[1] = batch[3]
    expected[2] = batch[4]
    assert torch.equal(queue.keys, expected)
    assert int(queue.ptr) == 3


@pytest.mark.parametrize("size,batches", [(8, [3, 3, 3, 3]), (5, [2, 4, 5, 1, 3]), (7, [7, 7, 1])])
def test_ptr_is_total_enqueued_mod_size(size, batches):
    queue = KeyQueue(size=size, dim=2)
    total = 0
    for n in batches:
        queue.enqueue(torch.randn(n, 2))
        total += n
        assert int(queue.ptr) == total % size
    assert queue.ptr.dtype == torch.long


def test_queue_holds_the_most_recent_keys_as_a_ring():
    """After many enqueues of varying size, row r holds the latest key written at index r."""
    size, dim = 6, 2
    queue = KeyQueue(size=size, dim=dim)
    reference = queue.keys.clone()
    position, value = 0, 0.0
    for n in [4, 5, 1, 6, 3, 2]:
        batch = distinct_keys(n, dim, value)
        queue.enqueue(batch)
        for i in range(n):  # the reference ring buffer, one row at a time
            reference[position] = batch[i]
            position = (position + 1) % size
        value += 10
        assert torch.equal(queue.keys, reference)


def test_batch_equal_to_size_replaces_everything_starting_at_ptr():
    queue = KeyQueue(size=4, dim=2)
    queue.enqueue(distinct_keys(1, 2, 0))  # ptr -> 1
    batch = distinct_keys(4, 2, 10)
    queue.enqueue(batch)
    expected = torch.stack([batch[3], batch[0], batch[1], batch[2]])
    assert torch.equal(queue.keys, expected)
    assert int(queue.ptr) == 1


def test_batch_larger_than_size_raises_and_leaves_queue_untouched():
    queue = KeyQueue(size=4, dim=2)
    before, ptr = queue.keys.clone(), int(queue.ptr)
    with pytest.raises(ValueError):
        queue.enqueue(torch.randn(5, 2))
    assert torch.equal(queue.keys, before)
    assert int(queue.ptr) == ptr


@pytest.mark.parametrize("size,dim", [(0, 4), (4, 0)])
def test_invalid_sizes_raise(size, dim):
    with pytest.raises(ValueError):
        KeyQueue(size=size, dim=dim)


def test_keys_and_ptr_are_buffers_in_state_dict_and_load_back_exactly():
    queue = KeyQueue(size=6, dim=3)
    assert set(dict(queue.named_buffers())) == {"keys", "ptr"}
    assert list(queue.parameters()) == []
    queue.enqueue(torch.randn(4, 3))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr"}
    fresh = KeyQueue(size=6, dim=3)
    assert not torch.equal(fresh.keys, queue.keys)  # random init differs
    fresh.load_state_dict(state)
    assert torch.equal(fresh.keys, queue.keys)
    assert int(fresh.ptr) == 4
    # The loaded queue continues where the saved one stopped.
    nxt = distinct_keys(3, 3, 7)
    queue.enqueue(nxt)
    fresh.enqueue(nxt)
    assert torch.equal(fresh.keys, queue.keys)
    assert int(fresh.ptr) == int(queue.ptr) == 1


def test_initial_keys_are_unit_norm_and_not_degenerate():
    queue = KeyQueue(size=32, dim=8)
    norms = queue.keys.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(32), atol=1e-6, rtol=0)
    # Random directions, not one repeated vector.
    assert torch.unique(queue.keys, dim=0).shape[0] == 32


def test_enqueue_copies_and_detaches_the_input():
    queue = KeyQueue(size=4, dim=2)
    source = torch.randn(2, 2, requires_grad=True)
    keys = source * 2.0  # a non-leaf with a grad_fn
    queue.enqueue(keys)
    stored = queue.keys[:2].clone()
    assert torch.equal(stored, keys.detach())
    assert not queue.keys.requires_grad
    assert queue.keys.grad_fn is None
    with torch.no_grad():
        keys.mul_(0).add_(123.0)  # the caller reuses its tensor
    assert torch.equal(queue.keys[:2], stored)


def test_enqueue_does_not_alias_a_plain_input_tensor():
    queue = KeyQueue(size=3, dim=2)
    keys = torch.ones(3, 2)
    queue.enqueue(keys)
    keys.fill_(-5.0)
    assert torch.equal(queue.keys, torch.ones(3, 2))
    assert queue.keys.data_ptr() != keys.data_ptr()


def test_enqueue_casts_to_the_queue_dtype():
    queue = KeyQueue(size=4, dim=2)
    queue.enqueue(torch.full((2, 2), 0.5, dtype=torch.bfloat16))
    assert queue.keys.dtype == torch.float32
    assert torch.equal(queue.keys[:2], torch.full((2, 2), 0.5))
