"""Specification of the draft vocabulary (drafters.DraftVocab, --draft_vocab=N): heads draft from a
subset of token ids (the most frequent in the training data), verification keeps the full
vocabulary, so the output is unchanged: greedy token for token, sampling in distribution."""
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import drafters
import sample
from decoding import Decoding
from batched import generate_batch, self_drafter
from conftest import (N_RUNS, TV_BOUND, exact_vanilla_distribution, one_line_error, random_mtp,
                      tiny_vocab_model, total_variation)
from data.text import frequent_tokens
from drafters import DraftVocab, heads_drafter
from sample import generate, generate_self_speculative

DESIGNS = [dict(head_type='block'), dict(head_type='resblock'),
           dict(head_type='sequential', head_attention=False),
           dict(head_type='sequential', head_attention=True)]


@pytest.mark.parametrize('design', DESIGNS, ids=lambda d: '+'.join(map(str, d.values())))
def test_greedy_with_a_draft_vocabulary_equals_vanilla_alone_and_batched(design):
    model = random_mtp(seed=4, **design)
    subset = [0, 2, 3, 5, 8, 12]
    prompts = [[1, 2, 3], [7], [4, 4, 9, 11, 0]]
    rows = generate_batch(model, prompts, 30, temperature=0, n_drafts=3,
                          make_drafter=self_drafter(model, subset))
    for prompt, row in zip(prompts, rows):
        alone = generate_self_speculative(model, prompt, 30, temperature=0, draft_vocab=subset)
        assert alone.tokens == row.tokens == generate(model, prompt, 30, temperature=0).tokens
        assert alone.stats.summary()['tau'] == row.stats.summary()['tau']


def test_mlp_sequential_heads_past_the_table_vocabulary_draft_the_same():
    """Past 4096 tokens row_chain computes M_k's token half per row instead of a V x C table:
    the drafts (and so the output and tau) are those of the table, alone and batched."""
    model = random_mtp(vocab=5000, seed=6, head_type='sequential', head_attention=False)
    prompts = [[1, 2, 3], [4999, 7], [0, 4, 4, 9, 11]]
    rows = generate_batch(model, prompts, 20, temperature=0, n_drafts=3,
                          make_drafter=self_drafter(model, [0, 1, 2, 3, 4, 7, 4999]))
    for prompt, row in zip(prompts, rows):
        assert row.tokens == generate(model, prompt, 20, temperature=0).tokens
    drafter = heads_drafter(model, DraftVocab(model, lambda logits: (logits.argmax(-1), logits)))
    small = drafters.row_weights(model, max_table_vocab=10 ** 6)  # the table, for comparison
    h, token = torch.randn(4, model.config.n_embd), torch.tensor([3, 4999, 0, 12])
    with torch.no_grad():
        torch.testing.assert_close(drafters.row_chain(drafter.rows, h, token, drafter.propose),
                                   drafters.row_chain(small, h, token, drafter.propose))


def test_drafts_stay_in_the_subset_and_q_is_zero_outside_it():
    """q over the full vocabulary: the subset's softmax (the sampling settings applied to the
    subset's logits), 0 elsewhere; the drafts are the subset's own ids."""
    model = random_mtp(seed=5, head_type='resblock')
    subset = torch.tensor([1, 4, 6, 10])
    pick = Decoding([0], 1, 0.7, 0, 1.0, (), torch.Generator().manual_seed(0)).pick
    h = torch.randn(50, model.config.n_embd)
    drafts, q = DraftVocab(model, pick, subset)(h)
    assert set(drafts.tolist()) <= set(subset.tolist()) and len(set(drafts.tolist())) > 1
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[subset] = False
    assert q[:, outside].abs().sum() == 0
    with torch.no_grad():
        want = F.softmax(model.unembed(h)[:, subset] / 0.7, dim=-1)
    torch.testing.assert_close(q[:, subset], want)


# -----------------------------------------------------------------------------
# sampling: lossless when the true token is often outside the subset

SUBSET = [1]  # of 3 tokens: drafts are always token 1, the target often says 0 or 2


def first_three_tokens(model, prompt, subset):
    g = torch.Generator().manual_seed(0)
    rows = generate_batch(model, [prompt] * N_RUNS, 4, generator=g, n_drafts=2,
                          make_drafter=self_drafter(model, subset))
    return [tuple(row.tokens[:3]) for row in rows]


def test_sampling_with_a_draft_vocabulary_matches_vanilla_distribution():
    model, prompt = tiny_vocab_model()
    exact = exact_vanilla_distribution(model, prompt, 3, temperature=1.0)
    assert total_variation(first_three_tokens(model, prompt, SUBSET), exact) < TV_BOUND


def test_a_q_that_is_not_zero_outside_the_subset_fails_the_distribution_test(monkeypatch):
    """Negative control: drafts drawn from the subset but q reported over the full vocabulary
    (the bug of trimming the draw and not the distribution) is caught."""
    def full_vocabulary_q(self, h):
        normed = F.layer_norm(h, *self.ln_f)
        tokens, _ = self.pick(F.linear(normed, self.weight))
        return self.ids[tokens], F.softmax(F.linear(normed, model.lm_head.weight), -1)
    model, prompt = tiny_vocab_model()
    monkeypatch.setattr(DraftVocab, '__call__', full_vocabulary_q)
    exact = exact_vanilla_distribution(model, prompt, 3, temperature=1.0)
    assert total_variation(first_three_tokens(model, prompt, SUBSET), exact) > 1.5 * TV_BOUND


# -----------------------------------------------------------------------------
# which tokens: the most frequent of the training data

def test_frequent_tokens_counts_the_training_data(tmp_path):
    ckpt = dict(model_args=dict(vocab_size=13), config=dict(data_dir=str(tmp_path)), meta={})
    np.array([5, 5, 5, 2, 2, 9, 9, 7, 12, 12, 12, 12], dtype=np.uint16).tofile(
        tmp_path / 'train.bin')
    np.array([0], dtype=np.uint16).tofile(tmp_path / 'val.bin')
    assert frequent_tokens(ckpt, 3).tolist() == [2, 5, 12]   # 12 x4, 5 x3, then 2 before 9
    assert frequent_tokens(ckpt, 100).tolist() == list(range(13))  # (all, when N >= V)
    (tmp_path / 'train.bin').unlink()
    one_line_error(frequent_tokens, ckpt, 3, match='train.bin')


def test_cli_speculative_with_a_draft_vocabulary(counting_ckpt, tmp_path):
    """The counting checkpoint's val.bin has a train.bin twin here: --draft_vocab=5 keeps the 5
    most frequent (0..4); drafts outside them are never made, the output is unchanged."""
    for name in ('ckpt.pt', 'val.bin'):
        shutil.copy(counting_ckpt / name, tmp_path / name)
    np.array([0, 1, 2, 3, 4] * 3 + list(range(13)), dtype=np.uint16).tofile(tmp_path / 'train.bin')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    ckpt['config']['data_dir'] = str(tmp_path)
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    args = [f"--ckpt={tmp_path / 'ckpt.pt'}", '--prompt=a', '--max_new_tokens=12',
            '--temperature=0', '--speculative=true', '--quiet=true']
    full, trimmed = sample.main(args), sample.main(args + ['--draft_vocab=5'])
    assert trimmed['samples'] == full['samples'] == ['bcdefghijklm']
    assert trimmed['tau'] < full['tau']  # drafts of f..m are no longer made
    one_line_error(sample.main, args + ['--draft_vocab=-1'], match='draft_vocab')
