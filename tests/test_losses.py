"""info_nce and contrastive_top1 against hand-built logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moco.losses import contrastive_top1, info_nce, nearest_in_queue


def unit(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def reference_logits(q, k, negatives, temperature):
    """Column 0 is q_i . k_i, columns 1..K are q_i . negatives_j, everything divided by T."""
    n, num_neg = q.shape[0], negatives.shape[0]
    logits = torch.empty(n, 1 + num_neg, dtype=q.dtype)
    for i in range(n):
        logits[i, 0] = (q[i] * k[i]).sum()
        for j in range(num_neg):
            logits[i, 1 + j] = (q[i] * negatives[j]).sum()
    return logits / temperature


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_equals_cross_entropy_on_hand_built_logits(temperature):
    q, k, negatives = unit(5, 8, seed=0), unit(5, 8, seed=1), unit(7, 8, seed=2)
    loss, logits = info_nce(q, k, negatives, temperature)
    expected_logits = reference_logits(q, k, negatives, temperature)
    assert logits.shape == (5, 1 + 7)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    expected = F.cross_entropy(expected_logits, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    # And the same written out as -log softmax of column 0, averaged over queries.
    by_hand = -(expected_logits[:, 0] - expected_logits.logsumexp(dim=1)).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-6, rtol=1e-6)


def test_positive_is_in_column_zero():
    """A query equal to its key and orthogonal to every negative: column 0 holds 1/T, rest 0."""
    q = torch.eye(4)[:2]  # 2 x 4
    k = q.clone()
    negatives = torch.eye(4)[2:]  # 2 x 4, orthogonal to both queries
    loss, logits = info_nce(q, k, negatives, temperature=0.5)
    expected = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert torch.equal(logits, expected)
    torch.testing.assert_close(loss, torch.tensor(-math.log(math.exp(2) / (math.exp(2) + 2))))


def test_loss_is_low_when_positive_matches_and_high_when_it_does_not():
    q = unit(4, 6, seed=3)
    negatives = unit(50, 6, seed=4)
    good, _ = info_nce(q, q.clone(), negatives, 0.1)
    bad, _ = info_nce(q, -q, negatives, 0.1)
    assert good < bad


def test_gradient_flows_to_q_with_the_reference_value():
    q = unit(3, 4, seed=5).requires_grad_()
    k, negatives = unit(3, 4, seed=6), unit(6, 4, seed=7)
    loss, _ = info_nce(q, k, negatives, 0.2)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    q2 = q.detach().clone().requires_grad_()
    ref = F.cross_entropy(reference_logits(q2, k, negatives, 0.2), torch.zeros(3, dtype=torch.long))
    ref.backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-6, rtol=1e-5)


def test_gradient_does_not_flow_to_keys_or_negatives_even_if_they_require_it():
    q = unit(3, 4, seed=5).requires_grad_()
    k = unit(3, 4, seed=6).requires_grad_()
    negatives = unit(6, 4, seed=7).requires_grad_()
    loss, _ = info_nce(q, k, negatives, 0.2)
    loss.backward()
    assert q.grad is not None
    assert negatives.grad is None
    assert k.grad is None


def test_queue_buffer_read_as_negatives_gets_no_gradient():
    """Negatives coming from a buffer (no requires_grad) stay out of the graph."""
    q = unit(3, 4, seed=8).requires_grad_()
    negatives = unit(6, 4, seed=9)
    loss, logits = info_nce(q, unit(3, 4, seed=10), negatives, 0.2)
    assert logits.requires_grad
    loss.backward()
    assert not negatives.requires_grad and negatives.grad is None


def test_under_bf16_autocast_loss_is_computed_in_float32():
    q, k, negatives = unit(6, 16, seed=11), unit(6, 16, seed=12), unit(40, 16, seed=13)
    loss32, logits32 = info_nce(q, k, negatives, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Sanity check that autocast is really active: a plain matmul would come out in bf16.
        assert (q @ negatives.T).dtype == torch.bfloat16
        loss_ac, logits_ac = info_nce(q, k, negatives, 0.07)
    assert logits_ac.dtype == torch.float32
    assert loss_ac.dtype == torch.float32
    torch.testing.assert_close(logits_ac, logits32, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_ac, loss32, atol=1e-6, rtol=1e-6)


def test_bf16_inputs_are_upcast_before_the_dot_products():
    """q, k in bf16 (as an encoder under autocast returns them): logits fp32 of the bf16 values."""
    q, k, negatives = unit(4, 8, seed=14), unit(4, 8, seed=15), unit(9, 8, seed=16)
    qb, kb = q.bfloat16(), k.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = info_nce(qb, kb, negatives, 0.2)
    assert logits.dtype == torch.float32
    expected = reference_logits(qb.float(), kb.float(), negatives, 0.2)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_contrastive_top1_on_hand_made_logits():
    logits = torch.tensor(
        [
            [5.0, 1.0, 2.0],  # positive wins
            [0.0, 3.0, -1.0],  # a negative wins
            [2.0, 1.9, 1.8],  # positive wins narrowly
            [-1.0, -2.0, 0.5],  # a negative wins
            [9.0, 8.0, 7.0],  # positive wins
        ]
    )
    assert contrastive_top1(logits).item() == pytest.approx(3 / 5)
    assert contrastive_top1(logits[[0, 2, 4]]).item() == 1.0
    assert contrastive_top1(logits[[1, 3]]).item() == 0.0


# ------------------------------------------------------------ positives drawn from the queue
def test_nearest_in_queue_is_the_row_of_highest_cosine():
    keys, queue = unit(6, 8, seed=10), unit(40, 8, seed=11)
    neighbours, rows = nearest_in_queue(keys, queue)
    for i in range(6):
        cosines = [(keys[i] * queue[j]).sum() for j in range(40)]
        best = max(range(40), key=lambda j: cosines[j])
        assert int(rows[i]) == best
        assert torch.equal(neighbours[i], queue[best])


def test_a_key_already_in_the_queue_is_its_own_nearest_neighbour():
    queue = unit(30, 8, seed=12)
    neighbours, rows = nearest_in_queue(queue[[4, 17, 4]], queue)
    assert rows.tolist() == [4, 17, 4]
    assert torch.equal(neighbours, queue[[4, 17, 4]])


def test_left_out_negative_drops_out_of_the_softmax():
    """The loss with row j of the queue left out for query i equals the cross-entropy over the
    logits with that column removed: the positive taken from the queue is not also a negative."""
    q, negatives = unit(4, 8, seed=13), unit(9, 8, seed=14)
    left_out = torch.tensor([2, 0, 8, 2])
    k = negatives[left_out]
    loss, logits = info_nce(q, k, negatives, 0.1, left_out=left_out)
    full = reference_logits(q, k, negatives, 0.1)
    assert torch.isneginf(logits[torch.arange(4), 1 + left_out]).all()
    per_query = []
    for i in range(4):
        kept = [c for c in range(10) if c != 1 + int(left_out[i])]
        per_query.append(-(full[i, 0] - full[i, kept].logsumexp(dim=0)))
    torch.testing.assert_close(loss, torch.stack(per_query).mean(), atol=1e-5, rtol=1e-5)
    # Without leaving it out, the duplicate lowers the positive's share: a higher loss.
    plain, _ = info_nce(q, k, negatives, 0.1)
    assert plain > loss


def test_left_out_negative_gives_the_gradient_of_the_logits_without_it():
    """-inf in the logits must not turn into NaN in backward: the query's gradient is that of
    the cross-entropy over the other columns."""
    q = unit(3, 8, seed=15).requires_grad_(True)
    negatives = unit(5, 8, seed=16)
    left_out = torch.tensor([1, 1, 3])
    k = negatives[left_out]
    loss, _ = info_nce(q, k, negatives, 0.2, left_out=left_out)
    (grad,) = torch.autograd.grad(loss, q)
    q_ref = q.detach().clone().requires_grad_(True)
    full = reference_logits(q_ref, k, negatives, 0.2)
    keep = torch.ones_like(full, dtype=torch.bool)
    keep[torch.arange(3), 1 + left_out] = False
    reference = F.cross_entropy(full[keep].view(3, 5), torch.zeros(3, dtype=torch.long))
    (grad_ref,) = torch.autograd.grad(reference, q_ref)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


def test_nearest_in_queue_under_bf16_autocast_tells_near_ties_apart():
    """Cosines of 0.9990 and 0.9995 are one number in bf16: the search must run in fp32."""
    key = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([math.acos(0.9990), math.acos(0.9995)])
    queue = torch.stack([angles.cos(), angles.sin()], dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert (key.bfloat16() @ queue.bfloat16().T).unique().numel() == 1  # a tie in bf16
        _, rows = nearest_in_queue(key, queue)
    assert rows.tolist() == [1]
