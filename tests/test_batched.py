"""Specification of batched decoding (batched.generate_batch): many prompts at once,
each row exactly what decoding its prompt alone gives (sample.generate and the speculative loops).

Exact means: in fp32 every greedy row equals the prompt decoded alone, token for token, with the
same tau and acceptance; a row may differ only at a near-tie (top-two logits within 1e-5, from
batched arithmetic), and such rows are counted and reported. Sampled rows are distributed exactly
as vanilla sampling (the goodness-of-fit test and its negative controls, conftest.py).
"""
import json

import pytest
import torch

import batched
import sample
from conftest import (N_RUNS, TV_BOUND, accept_every_draft, counting_mtp,
                      exact_vanilla_distribution, one_line_error, random_mtp,
                      resample_rejected_from_p, tiny_vocab_model, total_variation)
from batched import Batch, generate_batch, model_drafter, self_drafter
from decoding import Decoding
from sample import generate, generate_self_speculative, generate_two_model

# the decoding modes: (head design and options, or 'vanilla' / 'two-model')
MODES = ['vanilla', 'block', 'resblock', 'sequential', 'sequential+attention', 'two-model']
GAMMA = 3  # two-model drafts per step


def models_for(mode, arch='gpt2', seed=1):
    """(target, draft model or None) for a mode: random weights, untrained heads."""
    head_type, _, attention = mode.partition('+')
    if mode in ('vanilla', 'two-model'):
        head_type = 'resblock'
    target = random_mtp(seed=seed, arch=arch, head_type=head_type, head_attention=bool(attention))
    return target, (random_mtp(seed=seed + 1, n_layer=1, n_future=1, arch=arch)
                    if mode == 'two-model' else None)


def decode_alone(mode, target, draft, prompt, max_new_tokens, **sampling):
    if mode == 'vanilla':
        return generate(target, prompt, max_new_tokens, **sampling)
    if mode == 'two-model':
        return generate_two_model(target, draft, prompt, max_new_tokens, gamma=GAMMA, **sampling)
    return generate_self_speculative(target, prompt, max_new_tokens, **sampling)


def decode_batch(mode, target, draft, prompts, max_new_tokens, **sampling):
    if mode == 'vanilla':
        return generate_batch(target, prompts, max_new_tokens, **sampling)
    if mode == 'two-model':
        return generate_batch(target, prompts, max_new_tokens, make_drafter=model_drafter(
            draft, GAMMA), n_drafts=GAMMA, **sampling)
    return generate_batch(target, prompts, max_new_tokens, make_drafter=self_drafter(target),
                          n_drafts=target.config.n_future - 1, **sampling)


def mixed_prompts(n, vocab=13, seed=0, max_len=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (n_tokens,), generator=g).tolist() for n_tokens in lengths]


def assert_rows_equal_or_near_ties(target, prompts, rows, alone):
    """Each batched row equals its prompt decoded alone (tokens, tau, acceptance), or differs
    first where the target's top-two logits are within 1e-5. Returns how many near-ties."""
    near_ties = 0
    for prompt, row, one in zip(prompts, rows, alone):
        if row.tokens == one.tokens:
            for key in ('tau', 'acceptance', 'new_tokens', 'target_forwards', 'draft_forwards'):
                assert row.stats.summary()[key] == one.stats.summary()[key], key
            continue
        first = next(i for i, (a, b) in enumerate(zip(row.tokens + [None], one.tokens + [None]))
                     if a != b)
        with torch.no_grad():
            logits, _ = target(torch.tensor([prompt + one.tokens[:first]]), n_heads=1)
        top2 = logits[0, -1, 0].topk(2).values
        assert float(top2[0] - top2[1]) < 1e-5, f"row differs at {first} without a near-tie"
        near_ties += 1
    return near_ties


# -----------------------------------------------------------------------------
# greedy: every row is its prompt decoded alone

@pytest.mark.parametrize('mode,arch', [(mode, 'gpt2') for mode in MODES] + [
    (mode, 'neox') if mode == 'sequential' else pytest.param(mode, 'neox', marks=pytest.mark.slow)
    for mode in MODES])
def test_greedy_rows_equal_each_prompt_decoded_alone(mode, arch, record_property):
    """Mixed prompt lengths, a max_new_tokens per row (0 and 1 included), a stop sequence."""
    target, draft = models_for(mode, arch)
    prompts = mixed_prompts(9)
    budgets = [0, 1, 2, 7, 15, 30, 30, 40, 20]
    rows = decode_batch(mode, target, draft, prompts, budgets, temperature=0, stop=[3, 4])
    alone = [decode_alone(mode, target, draft, p, n, temperature=0, stop=[3, 4])
             for p, n in zip(prompts, budgets)]
    near_ties = assert_rows_equal_or_near_ties(target, prompts, rows, alone)
    record_property('near_ties', near_ties)  # (reported in the junit XML; none expected here)
    assert sum(len(row.tokens) for row in rows) > 60  # the rows decoded something
    if mode != 'vanilla':
        assert sum(row.stats.decode_forwards for row in rows) > 0


@pytest.mark.parametrize('mode', MODES)
def test_a_batch_of_one_is_the_prompt_decoded_alone(mode):
    target, draft = models_for(mode, seed=3)
    prompt = mixed_prompts(1, seed=4)[0]
    [row] = decode_batch(mode, target, draft, [prompt], 25, temperature=0)
    one = decode_alone(mode, target, draft, prompt, 25, temperature=0)
    assert row.tokens == one.tokens and row.stats.summary()['tau'] == one.stats.summary()['tau']


@pytest.mark.parametrize('head_type', ['block', 'sequential'])  # (counting_mtp's designs)
def test_rows_that_accept_every_draft_and_rows_that_accept_none(head_type):
    """Perfect heads accept everything (tau = n_future); heads whose first draft is always wrong
    accept nothing (tau = 1); both emit vanilla's tokens, in one batch each."""
    prompts = mixed_prompts(5, seed=5)
    budgets = [1 + 4 * 6] * 5  # 6 decode steps of n_future tokens after the prompt's forward
    perfect = counting_mtp(head_type=head_type)
    wrong = counting_mtp(head_type=head_type, wrong=[(2, x) for x in range(13)])
    for model, tau, acceptance in ((perfect, 4.0, 1.0), (wrong, 1.0, 0.0)):
        rows = decode_batch(head_type, model, None, prompts, budgets, temperature=0)
        for prompt, row in zip(prompts, rows):
            assert row.tokens == generate(model, prompt, budgets[0], temperature=0).tokens
            assert row.stats.summary()['tau'] == tau
            assert row.stats.summary()['acceptance'][0] == acceptance


def test_finished_rows_leave_the_batch(monkeypatch):
    """Rows that stop (a stop sequence, their max_new_tokens) are dropped from the cache: the
    forwards after they end run on fewer rows."""
    sizes = []
    forward = Batch.forward
    monkeypatch.setattr(Batch, 'forward', lambda self, feeds: sizes.append(len(feeds))
                        or forward(self, feeds))
    model = counting_mtp(head_type='sequential')  # counts: x + 1 follows x
    prompts = [[0], [5], [9], [2]]
    rows = decode_batch('sequential', model, None, prompts, [3, 20, 20, 20], temperature=0,
                        stop=[12, 0])  # 12 0 comes after 11: every row but the first stops
    assert [row.tokens for row in rows] == [[1, 2, 3], list(range(6, 12)), [10, 11],
                                            list(range(3, 12))]
    assert sizes[0] == 4 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 1


def test_max_new_tokens_zero_everywhere_runs_no_forward(monkeypatch):
    monkeypatch.setattr(Batch, 'forward', lambda *a: pytest.fail("a forward ran"))
    rows = generate_batch(random_mtp(), [[1, 2], [3]], 0)
    assert [row.tokens for row in rows] == [[], []]


# -----------------------------------------------------------------------------
# the ragged cache

@pytest.mark.parametrize('arch', ['gpt2', 'neox'])
def test_ragged_feeds_give_each_rows_full_forward_logits(arch):
    """Rows fed chunks of different lengths, rolled back to different lengths in between, give
    the logits of each row's sequence run alone and uncached (learned and rotary positions)."""
    model = random_mtp(arch=arch, seed=2, n_future=2)
    seqs = mixed_prompts(4, seed=6, max_len=40)
    seqs = [s + s for s in seqs]  # up to 80 tokens
    runs = [Decoding(s, 0, 0.0, 0, 1.0, (), None) for s in seqs]
    batch, held = Batch(model, runs, n_drafts=8), [0] * len(seqs)
    g = torch.Generator().manual_seed(0)
    while any(h < len(s) for h, s in zip(held, seqs)):
        feeds = [s[h:h + int(torch.randint(0, 6, (), generator=g)) + 1] for s, h in
                 zip(seqs, held)]  # (empty for a row that is done)
        logits, _ = batch.forward(feeds)
        for b, (s, h, feed) in enumerate(zip(seqs, held, feeds)):
            if feed:
                with torch.no_grad():
                    full, _ = model(torch.tensor([s[:h + len(feed)]]), n_heads=1)
                torch.testing.assert_close(logits[b, :len(feed)], full[0, h:, 0])
        # keep a random part of what was fed (the rest: rejected drafts), at least one token
        held = [h + max(1, int(torch.randint(0, len(feed) + 1, (), generator=g)))
                if feed else h for h, feed in zip(held, feeds)]
        batch.rollback(held)


def test_a_request_that_does_not_fit_the_window_is_refused():
    """Batched rows do not slide their window: a prompt + max_new_tokens over block_size (the
    target's or the draft model's) is a one-line error."""
    target = random_mtp(block_size=64)
    draft = random_mtp(block_size=32, n_future=1, n_layer=1)
    one_line_error(generate_batch, target, [[1] * 10, [2] * 40], 30, match='block_size 64')
    one_line_error(lambda: generate_batch(target, [[1] * 10], 30, n_drafts=2,
                                          make_drafter=model_drafter(draft, 2)),
                   match="draft model's block_size 32")
    assert len(generate_batch(target, [[1] * 10, [2] * 40], 24)[1].tokens) == 24


# -----------------------------------------------------------------------------
# sampling: each row distributed exactly as vanilla sampling

PROMPTS = [[0, 2, 1], [2, 0, 1, 1, 0]]  # mixed lengths, N_RUNS rows each in one batch


def first_three_tokens_batched(model, prompts, draft=None, **sampling):
    """N_RUNS rows per prompt in one batch; the first 3 tokens of each row, per prompt."""
    g = torch.Generator().manual_seed(0)
    mode = 'two-model' if draft is not None else 'block'
    rows = decode_batch(mode, model, draft, [p for p in prompts for _ in range(N_RUNS)], 4,
                        generator=g, **sampling)  # 4: the second step verifies 2 drafts
    return [[tuple(row.tokens[:3]) for row in rows[i * N_RUNS:(i + 1) * N_RUNS]]
            for i in range(len(prompts))]


# (slow: 2,000 rows a test; the fast subset keeps the two-model test below and the draft
# vocabulary's batched test and control, tests/test_draft_vocab.py)
@pytest.mark.slow
@pytest.mark.parametrize('head_type', ['block', 'resblock', 'sequential'])
def test_sampled_rows_match_vanilla_distribution(head_type):
    model, _ = tiny_vocab_model(head_type)
    g = torch.Generator().manual_seed(0)
    rows = generate_batch(model, [p for p in PROMPTS for _ in range(N_RUNS)], 4, generator=g,
                          make_drafter=self_drafter(model), n_drafts=2)
    for i, prompt in enumerate(PROMPTS):
        samples = [tuple(row.tokens[:3]) for row in rows[i * N_RUNS:(i + 1) * N_RUNS]]
        exact = exact_vanilla_distribution(model, prompt, 3, temperature=1.0)
        assert total_variation(samples, exact) < TV_BOUND, prompt


@pytest.mark.slow
@pytest.mark.parametrize('wrong_rule', [accept_every_draft, resample_rejected_from_p])
def test_wrong_acceptance_rules_fail_the_batched_distribution_test(monkeypatch, wrong_rule):
    model, _ = tiny_vocab_model('block')
    monkeypatch.setattr(batched, 'verify', wrong_rule)
    tv = [total_variation(samples, exact_vanilla_distribution(model, prompt, 3, temperature=1.0))
          for prompt, samples in zip(PROMPTS, first_three_tokens_batched(model, PROMPTS))]
    assert max(tv) > 1.5 * TV_BOUND


def test_two_model_sampled_rows_with_top_k_and_top_p_match_vanilla_distribution():
    target, _ = tiny_vocab_model()
    draft = random_mtp(vocab=3, n_future=1, n_layer=1, std=0.5, seed=5)
    sampling = dict(temperature=0.8, top_k=2, top_p=0.9)
    for prompt, samples in zip(PROMPTS, first_three_tokens_batched(target, PROMPTS, draft,
                                                                    **sampling)):
        exact = exact_vanilla_distribution(target, prompt, 3, **sampling)
        assert total_variation(samples, exact) < TV_BOUND, prompt


# -----------------------------------------------------------------------------
# the command line: sample.py --prompts=FILE --batch_size=B

@pytest.mark.parametrize('mode', [[], ['--speculative=true'], ['--draft={ckpt}', '--gamma=2']])
def test_cli_decodes_a_prompts_file_in_batches_in_the_files_order(counting_ckpt, tmp_path,
                                                                   capsys, mode):
    ckpt = str(counting_ckpt / 'ckpt.pt')
    (tmp_path / 'prompts.txt').write_text('abc\nk\nfghij\n')
    summary = sample.main([f'--ckpt={ckpt}', f"--prompts={tmp_path / 'prompts.txt'}",
                           '--batch_size=2', '--max_new_tokens=5', '--temperature=0',
                           *[a.format(ckpt=ckpt) for a in mode]])
    assert summary['samples'] == ['defgh', 'lmabc', 'klmab']  # (x + 1 follows x, mod 13)
    assert summary['new_tokens'] == 15
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    if mode:
        assert summary['tau'] > 1


@pytest.mark.parametrize('lines,flags,fragment', [
    ('ab\\ncd\n', [], r"'\n'"),  # \n in a line is a newline (not in this vocabulary)
    ('', [], 'no prompts'),
    ('abc\n', ['--batch_size=0'], 'batch_size'),
    ('abc\n', ['--max_new_tokens=62'], 'block_size 64'),  # 3 + 62 > 64
    ('abc\n', ['--num_samples=2'], 'repeat lines'),
    ('abc\n', ['--draft_vocab=5'], '--speculative=true'),
])
def test_cli_prompts_file_errors(counting_ckpt, tmp_path, lines, flags, fragment):
    (tmp_path / 'prompts.txt').write_text(lines)
    one_line_error(sample.main, [f"--ckpt={counting_ckpt / 'ckpt.pt'}", *flags,
                                 f"--prompts={tmp_path / 'prompts.txt'}"], match=fragment)
