"""The nearest-neighbour picture's choices: which test images, which training images."""

import torch

from moco.eval.neighbours import nearest, query_indices


def test_queries_take_the_classes_in_turn_and_repeat_with_the_seed():
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 2, 2, 0])
    picked = query_indices(labels, 5, seed=3)
    assert [int(labels[i]) for i in picked] == [0, 1, 2, 0, 1]
    assert len(set(picked)) == 5
    assert picked == query_indices(labels, 5, seed=3)
    assert {tuple(query_indices(labels, 3, seed=s)) for s in range(10)} != {tuple(picked[:3])}


def test_queries_stop_when_the_test_set_runs_out():
    labels = torch.tensor([1, 0, 1])
    assert sorted(query_indices(labels, 10)) == [0, 1, 2]


def test_nearest_ranks_the_bank_by_cosine_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 0.5]])
    queries = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    # cosine, not distance: row 3 (far away, same direction) beats row 2 for the first query
    assert nearest(bank, queries, 3).tolist() == [[0, 3, 2], [1, 2, 3]]
