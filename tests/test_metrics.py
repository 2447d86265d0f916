"""Specification of the accuracy bookkeeping (metrics.py): top-k counts and Tally are
token-weighted."""
import torch

from metrics import Tally, count_topk


def test_count_topk_is_exact_and_skips_missing_targets():
    """Top-1 / top-5 hit counts on a hand-built score tensor; targets of -1 are not counted
    (neither as a target nor as a hit, even though index 0 might be a top score)."""
    V = 8
    order = torch.arange(V, 0, -1).float()          # token 0 best, 1 second, ... 7 worst
    scores = order.repeat(2, 3, 1)                   # (2, 3, V)
    targets = torch.tensor([[0, 1, 4],               # top1 hit, top5 hits (ranks 2 and 5)
                            [5, -1, 7]])             # miss (rank 6), ignored, miss
    n, hits = count_topk(scores, targets)
    assert n == 5
    assert hits == {1: 1, 5: 3}
    n, hits = count_topk(scores, torch.full((2, 3), -1))
    assert n == 0 and hits == {1: 0, 5: 0}
    n, hits = count_topk(scores[:, :, :3], torch.tensor([[0, 1, 2], [2, 1, 0]]))  # V < 5
    assert n == 6 and hits == {1: 2, 5: 6}


def test_tally_counts_tokens_not_batches():
    tally = Tally(k_ahead=1)
    scores = torch.tensor([[[0.1, 0.9]], [[0.8, 0.2]], [[0.3, 0.7]]])  # argmax 1, 0, 1
    tally.add(scores, torch.tensor([[1], [1], [1]]))  # 2 of 3 right
    tally.add(scores[:1], torch.tensor([[0]]))        # 0 of 1 right
    assert tally.result()['top1'] == [0.5]           # 2 / 4, not the mean of 2/3 and 0
    assert tally.result()['n'] == [4]
