"""Specification of sample.py: vanilla, self-speculative and two-model decoding.

Tiny fp32 models on the CPU (conftest.py). Two kinds:
  random_mtp    random weights with a large init (peaked, distinct distributions): its MTP
                heads are untrained, so drafts are mostly rejected;
  counting_mtp  hand-set weights whose next token is (x + 1) mod V and whose head i predicts
                (x + i) mod V: perfect drafts. `wrong` makes chosen (head, token) pairs draft
                a wrong token, so rejections happen at every draft position.
"""
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

import drafters
import sample
from common import UserError, load_checkpoint, save_checkpoint
from data.text import encode_prompt, stop_tokens
from conftest import (REPO, N_RUNS, TV_BOUND, accept_every_draft, counting_mtp,
                      exact_vanilla_distribution, one_line_error, random_mtp,
                      resample_rejected_from_p, run_cli, tiny_vocab_model, total_variation)
from drafters import ChainDrafter, DraftVocab
from head_designs import mix
from heads import MTPGPT, MTPConfig
from decoding import Stats, draw, probs_from_logits, verify
from sample import (generate, generate_self_speculative,
                    generate_two_model)


def random_prompts(n, vocab, max_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.fixture
def windows(monkeypatch):
    """Every sample.Window made, in order: a run's target window is the first it makes."""
    made = []

    class Recorded(sample.Window):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)
    monkeypatch.setattr(sample, 'Window', Recorded)
    return made


def assert_cache_equals_fresh_prefill(model, seq, window):
    """The target's cache after a run (the layers of the next-token path: trunk and head 1;
    drafters keep their own) equals a fresh prefill of the tokens it claims to hold."""
    cache = window.cache
    held = seq[window.start:window.start + cache.length]
    assert cache.length > 0 and len(held) == cache.length
    fresh = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([held]), cache=fresh, n_heads=1)
    for layer in [i for i, k in enumerate(fresh.k) if k is not None]:
        for got, want in ((cache.k, fresh.k), (cache.v, fresh.v)):
            torch.testing.assert_close(got[layer][:, :, :cache.length],
                                       want[layer][:, :, :cache.length], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the building blocks

def test_probs_from_logits_applies_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 0.0]])
    greedy = probs_from_logits(logits, temperature=0)
    assert greedy.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    torch.testing.assert_close(probs_from_logits(logits, 0.5), torch.softmax(logits / 0.5, -1))
    top2 = probs_from_logits(logits[:1], 1.0, top_k=2)[0]
    torch.testing.assert_close(top2[:2], torch.softmax(torch.tensor([2.0, 1.0]), -1))
    assert top2[2:].tolist() == [0, 0]
    p = torch.softmax(logits[:1], -1)[0]                  # [0.61, 0.22, 0.14, 0.03]
    nucleus = probs_from_logits(logits[:1], 1.0, top_p=0.7)[0]
    assert (nucleus > 0).tolist() == [True, True, False, False]   # 0.61 < 0.7 <= 0.61 + 0.22
    torch.testing.assert_close(nucleus[:2], p[:2] / p[:2].sum())
    assert (probs_from_logits(logits[:1], 1.0, top_p=0.5)[0] > 0).sum() == 1


@pytest.mark.parametrize('shape', [(65,), (3, 65), (2, 3, 7)])
def test_a_sampled_draw_is_torch_multinomials_draw_for_the_same_generator(shape):
    """draw's exponential race is torch.multinomial's one-sample path: the same tokens and the
    generator left in the same state, so a seed decodes as it did with multinomial (zeros in p
    included)."""
    for seed in range(50):
        p = torch.softmax(3 * torch.randn(shape), -1)
        p[..., :2] = 0
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        tokens = draw(p, greedy=False, generator=ours)
        reference = torch.multinomial(p.reshape(-1, shape[-1]), 1, generator=theirs)
        assert tokens.shape == shape[:-1] and tokens.flatten().tolist() == reference[:, 0].tolist()
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_verify_greedy_accepts_the_longest_matching_prefix_plus_the_free_token():
    def one_hot(tokens):
        return torch.nn.functional.one_hot(torch.tensor(tokens), 6).float()
    target = [3, 1, 4, 5]                       # the target's argmax at the k+1 positions
    p = one_hot(target)
    for drafts, emitted in (([3, 1, 4], [3, 1, 4, 5]),   # all accepted + bonus
                            ([3, 1, 0], [3, 1, 4]),      # draft 3 rejected: the target's 4 is free
                            ([3, 2, 4], [3, 1]),         # later matches do not count
                            ([0, 1, 4], [3]),
                            ([], [3])):                  # no drafts: one token
        d = torch.tensor(drafts, dtype=torch.long)
        q = one_hot(drafts) if drafts else torch.empty(0, 6)
        assert verify(p[:len(drafts) + 1], d, q, greedy=True) == emitted
        # with one-hot p and q the sampling rule is the greedy rule
        g = torch.Generator().manual_seed(0)
        assert verify(p[:len(drafts) + 1], d, q, greedy=False, generator=g) == emitted


def test_verify_sampling_emits_tokens_distributed_as_p():
    """One draft x ~ q: the first emitted token (accepted x, or the residual draw) ~ p[0]."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    n = 10000
    drafts = torch.multinomial(q[0], n, replacement=True, generator=g)
    first = [verify(p, drafts[i:i + 1], q, greedy=False, generator=g)[0] for i in range(n)]
    empirical = torch.bincount(torch.tensor(first), minlength=4).float() / n
    assert 0.5 * (empirical - p[0]).abs().sum() < 0.02  # noise: ~0.005
    # accepting every draft would give q instead: far outside that bound
    assert 0.5 * (q[0] - p[0]).abs().sum() > 0.3


# -----------------------------------------------------------------------------
# greedy: speculative output == vanilla output, token for token

HEAD_TYPES = ['block', 'resblock', 'sequential']  # resblock and sequential heads draft lazily


@pytest.mark.parametrize('head_type', HEAD_TYPES)
@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def test_greedy_self_speculative_equals_vanilla_with_untrained_heads(head_type, arch):
    model = random_mtp(head_type=head_type, arch=arch)
    stats = Stats(3)
    for prompt in random_prompts(50, 13, 40):
        vanilla = generate(model, prompt, 20, temperature=0)
        speculative = generate_self_speculative(model, prompt, 20, temperature=0)
        assert speculative.tokens == vanilla.tokens
        assert len(vanilla.tokens) == 20
        stats.add(speculative.stats)
    summary = stats.summary()
    assert summary['acceptance'][0] < 0.5          # mostly rejected drafts
    assert 1 <= summary['tau'] < 1.5


@pytest.mark.parametrize('head_type', ['block', 'sequential'])
def test_greedy_self_speculative_with_perfect_heads_accepts_everything(head_type, arch):
    n_future = 4
    model = counting_mtp(n_future=n_future, head_type=head_type, arch=arch)
    prompt = [5, 6, 7]
    max_new = 1 + 6 * n_future                     # the prompt's forward emits 1, then n per step
    vanilla = generate(model, prompt, max_new, temperature=0)
    speculative = generate_self_speculative(model, prompt, max_new, temperature=0)
    assert vanilla.tokens == [(8 + t) % 13 for t in range(max_new)]
    assert speculative.tokens == vanilla.tokens
    summary = speculative.stats.summary()
    assert summary['acceptance'] == [1.0] * (n_future - 1)
    assert summary['tau'] == n_future
    assert summary['target_forwards'] == 1 + 6
    assert vanilla.stats.summary()['tau'] == 1


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
@pytest.mark.parametrize('head_type', ['block', 'sequential'])
def test_rejections_at_every_draft_position_roll_back_exactly(head_type, arch, windows):
    """Heads 2..4 draft wrongly for about a third of the tokens: acceptance runs of every length,
    so the cache is rolled back at every offset. Output == vanilla, cache == fresh prefill."""
    rng = np.random.default_rng(0 if head_type == 'block' else 1)  # (a seed that does it)
    wrong = {(i, x) for i in range(2, 5) for x in range(13) if rng.random() < 0.35}
    model = counting_mtp(n_future=4, wrong=wrong, head_type=head_type, arch=arch)
    stats = Stats(3)
    for prompt in random_prompts(10, 13, 20, seed=1):
        vanilla = generate(model, prompt, 40, temperature=0)
        windows.clear()
        speculative = generate_self_speculative(model, prompt, 40, temperature=0)
        assert speculative.tokens == vanilla.tokens
        assert_cache_equals_fresh_prefill(model, prompt + speculative.tokens, windows[0])
        stats.add(speculative.stats)
    for accepted, drafted in zip(stats.accepted, stats.drafted):
        assert 0 < accepted < drafted               # accepted and rejected at every position
    assert 1 < stats.summary()['tau'] < 4


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def test_kv_cache_after_speculative_runs_equals_a_fresh_prefill(arch, windows):
    model = random_mtp(arch=arch)
    for prompt in random_prompts(5, 13, 30, seed=2):
        for temperature in (0.0, 1.0):
            windows.clear()
            run = generate_self_speculative(model, prompt, 25, temperature=temperature,
                                            generator=torch.Generator().manual_seed(0))
            assert_cache_equals_fresh_prefill(model, prompt + run.tokens, windows[0])
        draft = random_mtp(seed=1, n_future=1, arch=arch)
        windows.clear()
        run = generate_two_model(model, draft, prompt, 25, gamma=3, temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
        assert_cache_equals_fresh_prefill(model, prompt + run.tokens, windows[0])


def recomputed_q(model, seq, start, drafts, temperature):
    """The draft distributions q of sequential heads after seq (ending with the token just
    emitted) computed from scratch over the window seq[start:], no cache, each head reading
    the drafts given."""
    with torch.no_grad():
        window = torch.tensor(seq[start:])
        entry = mix(model.heads.whs_coef, model.trunk(window[None, :-1]))[0]
        forced = iter(drafts)
        pick = lambda logits: (next(forced), probs_from_logits(logits, temperature))  # noqa: E731
        return model.heads.chain(model, entry, window[1:], DraftVocab(model, pick))[1]


def drafts_checked_against_recomputation(monkeypatch, found, temperature):
    """Make every ChainDrafter.observe of a run also recompute its q from scratch, and record in
    `found` whether both agree within 1e-4 (at temperature 0, q is the one-hot greedy draft)."""
    observe = ChainDrafter.observe

    def checked(drafter, seq, trunk_hidden, start):
        observe(drafter, seq, trunk_hidden, start)
        want = recomputed_q(drafter.model, seq, start, drafter.drafts, temperature)
        found.append(bool(torch.allclose(drafter.q, want, atol=1e-4)))
    monkeypatch.setattr(ChainDrafter, 'observe', checked)


def parallel_drafts_checked(monkeypatch, model, found):
    """Make every parallel drafter's observe also compute heads 2..n of a full forward over the
    window (no cache) at the last verified position, and record whether the q agree."""
    cls = type(drafters.heads_drafter(model, None))
    observe = cls.observe

    def checked(drafter, seq, trunk_hidden, start):
        observe(drafter, seq, trunk_hidden, start)
        with torch.no_grad():
            logits = model(torch.tensor([seq[start:-1]]))[0][0, -1, 1:]
        found.append(bool(torch.allclose(drafter.q, probs_from_logits(logits, 1.0), atol=1e-5)))
    monkeypatch.setattr(cls, 'observe', checked)


@pytest.mark.parametrize('head_type', ['block', 'resblock'])
def test_parallel_drafts_equal_a_full_forwards_heads(monkeypatch, head_type):
    """Block heads draft with a KV cache of their own over the verified positions, which starts
    again when the window slides; resblock heads from the last verified row. At every step,
    across slides, their q equals heads 2..n of a full forward over the window."""
    model, found = random_mtp(block_size=32, head_type=head_type), []
    parallel_drafts_checked(monkeypatch, model, found)
    for prompt in random_prompts(4, 13, 50, seed=11):
        generate_self_speculative(model, prompt, 40, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0))
    assert len(found) > 50 and all(found)


def test_a_block_drafter_cache_kept_across_a_slide_fails_the_check(monkeypatch):
    """The negative control: a block drafter whose cache does not start again with the window."""
    class NeverReset(drafters.KVCache):
        def __init__(self, n_layers, max_len):
            super().__init__(n_layers, 16 * max_len)  # room for the stale positions

        def rollback(self, length):
            super().rollback(self.length if length == 0 else length)
    monkeypatch.setattr(drafters, 'KVCache', NeverReset)
    model, found = random_mtp(block_size=32, head_type='block'), []
    parallel_drafts_checked(monkeypatch, model, found)
    for prompt in random_prompts(2, 13, 50, seed=11):
        generate_self_speculative(model, prompt + [1] * 30, 20, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0))
    assert not all(found)


def counting_with_live_head_attention(wrong=(), seed=0):
    """counting_mtp with sequential heads whose attention outputs are not zeroed: drafts depend
    on the heads' cached keys and values (and are often right)."""
    model = counting_mtp(n_future=4, wrong=wrong, head_type='sequential', block_size=24)
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in model.heads:
            head.block.attn.c_proj.weight.normal_(0, 0.3)
    return model


def decode_sequential(model, prompts, temperature):
    for prompt in prompts:
        generate_self_speculative(model, prompt, 30, temperature=temperature,
                                  generator=torch.Generator().manual_seed(0))


def mlp_heads_with_whs(seed=0, std=0.3):
    """Sequential heads with an MLP body (the main job's) and WHS, weights moved off their init."""
    torch.manual_seed(seed)
    model = MTPGPT(MTPConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=32, block_size=24,
                             n_future=4, head_type='sequential', whs=True, bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


@pytest.mark.parametrize('temperature', [0.0, 1.0])
@pytest.mark.parametrize('make', [counting_with_live_head_attention, mlp_heads_with_whs],
                         ids=['attention-cache', 'mlp-row-chain'])
def test_sequential_drafts_equal_a_recomputation(monkeypatch, temperature, make):
    """Sequential heads with attention keep their own KV cache of the positions whose inputs were
    verified tokens and roll it back past the rest; heads with an MLP body draft on one row with
    raw ops (row_chain). At every step, with rejections at every draft position and a sliding
    window, their drafts equal drafts computed from scratch by the modules (no cache, no table)."""
    rng = np.random.default_rng(0)
    wrong = {(i, x) for i in range(2, 5) for x in range(13) if rng.random() < 0.35}
    model = make(wrong) if make is counting_with_live_head_attention else make()
    found = []
    drafts_checked_against_recomputation(monkeypatch, found, temperature)
    decode_sequential(model, random_prompts(6, 13, 40, seed=3), temperature)
    assert len(found) > 50 and all(found)


def test_a_draft_cache_not_rolled_back_fails_the_recomputation_check(monkeypatch):
    """The negative control: a heads' cache that keeps one position that read a draft."""
    class RolledBackOneShort(drafters.KVCache):
        def rollback(self, length):
            super().rollback(min(self.length, length + 1))
    model = counting_with_live_head_attention()
    monkeypatch.setattr(drafters, 'KVCache', RolledBackOneShort)
    found = []
    drafts_checked_against_recomputation(monkeypatch, found, 1.0)
    decode_sequential(model, random_prompts(3, 13, 10, seed=3), 1.0)
    assert not all(found)


@pytest.mark.parametrize('kw', [dict(head_attention=False), dict(whs=True, head_attention=True),
                                dict(whs=True, head_attention=False)],
                         ids=['mlp-heads', 'whs', 'whs-mlp-heads'])
def test_sequential_heads_variants_decode_exactly(kw):
    """head_attention=False (Hydra's MLP body, which reads no other position) and WHS (head 2
    reads a mix of the trunk's layers, kept per position by the decoding window): greedy output
    equals vanilla, prompts longer than the window included."""
    torch.manual_seed(0)
    model = MTPGPT(MTPConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=32, block_size=24,
                             n_future=4, head_type='sequential', **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    stats = Stats(3)
    for prompt in random_prompts(8, 13, 40, seed=4):
        vanilla = generate(model, prompt, 30, temperature=0)
        speculative = generate_self_speculative(model, prompt, 30, temperature=0)
        assert speculative.tokens == vanilla.tokens
        stats.add(speculative.stats)
    assert stats.accepted[0] > 0  # some drafts stand: the chain's state is exercised


# -----------------------------------------------------------------------------
# sampling: speculative samples are distributed exactly as vanilla samples

def first_three_tokens(model, prompt):
    g = torch.Generator().manual_seed(0)
    # max_new_tokens=4: the second step verifies 2 drafts (heads 2 and 3) for tokens 2 and 3
    return [tuple(generate_self_speculative(model, prompt, 4, temperature=1.0, generator=g)
                  .tokens[:3]) for _ in range(N_RUNS)]


SLOW = pytest.mark.slow


@pytest.mark.parametrize('head_type,arch', [('block', 'gpt2'),
                                            pytest.param('resblock', 'gpt2', marks=SLOW),
                                            pytest.param('sequential', 'gpt2', marks=SLOW),
                                            pytest.param('block', 'neox', marks=SLOW)])
def test_self_speculative_sampling_matches_vanilla_distribution(head_type, arch):
    model, prompt = tiny_vocab_model(head_type, arch)
    exact = exact_vanilla_distribution(model, prompt, 3, temperature=1.0)
    assert total_variation(first_three_tokens(model, prompt), exact) < TV_BOUND


@pytest.mark.parametrize('head_type', ['block', pytest.param('sequential',
                                                             marks=pytest.mark.slow)])
@pytest.mark.parametrize('wrong_rule', [pytest.param(accept_every_draft, marks=pytest.mark.slow),
                                        resample_rejected_from_p])
def test_wrong_acceptance_rules_fail_the_distribution_test(monkeypatch, wrong_rule, head_type):
    """The bound above is tight enough to catch plausible mistakes."""
    model, prompt = tiny_vocab_model(head_type)
    exact = exact_vanilla_distribution(model, prompt, 3, temperature=1.0)
    monkeypatch.setattr(sample, 'verify', wrong_rule)
    assert total_variation(first_three_tokens(model, prompt), exact) > 1.5 * TV_BOUND


def test_two_model_sampling_with_top_k_and_top_p_matches_vanilla_distribution():
    target, prompt = tiny_vocab_model()
    draft = random_mtp(vocab=3, n_future=1, n_layer=1, std=0.5, seed=5)
    sampling = dict(temperature=0.8, top_k=2, top_p=0.9)
    exact = exact_vanilla_distribution(target, prompt, 3, **sampling)
    g = torch.Generator().manual_seed(0)
    # max_new_tokens=4: the second step verifies 2 drafts for tokens 2 and 3
    samples = [tuple(generate_two_model(target, draft, prompt, 4, gamma=2, generator=g,
                                        **sampling).tokens[:3]) for _ in range(N_RUNS)]
    assert total_variation(samples, exact) < TV_BOUND


# -----------------------------------------------------------------------------
# two-model speculative decoding

def test_two_model_with_draft_equal_to_target_accepts_every_draft():
    model = random_mtp(n_future=2)
    gamma = 3
    for prompt in random_prompts(5, 13, 30, seed=6):
        max_new = 1 + 5 * (gamma + 1)
        vanilla = generate(model, prompt, max_new, temperature=0)
        run = generate_two_model(model, model, prompt, max_new, gamma=gamma, temperature=0)
        assert run.tokens == vanilla.tokens
        summary = run.stats.summary()
        assert summary['tau'] == gamma + 1
        assert summary['acceptance'] == [1.0] * gamma
        assert summary['draft_forwards'] == 5 * gamma
        sampled = generate_two_model(model, model, prompt, max_new, gamma=gamma, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0))
        assert sampled.stats.summary()['acceptance'] == [1.0] * gamma   # p == q: never rejected


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def test_two_model_greedy_with_a_different_draft_equals_vanilla(arch):
    target, draft = random_mtp(seed=7, arch=arch), random_mtp(seed=8, n_future=1, n_layer=1)
    for prompt in random_prompts(10, 13, 30, seed=9):
        vanilla = generate(target, prompt, 20, temperature=0)
        run = generate_two_model(target, draft, prompt, 20, gamma=4, temperature=0)
        assert run.tokens == vanilla.tokens
        assert run.stats.draft_forwards > 0


# -----------------------------------------------------------------------------
# edge cases

def test_max_new_tokens_zero_runs_no_forward_and_negative_is_an_error():
    model = random_mtp()
    for run in (generate(model, [1, 2], 0), generate_self_speculative(model, [1, 2], 0),
                generate_two_model(model, model, [1, 2], 0)):
        assert run.tokens == [] and run.stats.target_forwards == 0
        assert run.stats.summary()['tau'] is None
    with pytest.raises(UserError, match='max_new_tokens'):
        generate_self_speculative(model, [1, 2], -1)


def test_empty_prompt_is_an_error_for_char_models_and_starts_bpe_models_at_eot():
    model = random_mtp()
    with pytest.raises(UserError, match='empty prompt'):
        generate_self_speculative(model, [], 5)

    class CharTokenizer:
        eot = None
        encode = staticmethod(lambda text: [ord(c) - 97 for c in text])

    class BPETokenizer(CharTokenizer):
        eot = 12

    with pytest.raises(UserError, match='empty prompt'):
        encode_prompt('', CharTokenizer())
    assert encode_prompt('', BPETokenizer()) == [12]
    assert encode_prompt('abc', BPETokenizer()) == [0, 1, 2]
    assert stop_tokens('auto', BPETokenizer()) == [12]
    assert stop_tokens('auto', CharTokenizer()) == []


@pytest.mark.parametrize('head_type', ['block', 'sequential'])
def test_prompt_longer_than_block_size_slides_the_window(head_type, windows):
    model = random_mtp(block_size=32, head_type=head_type)
    counting = counting_mtp(block_size=32, head_type=head_type)
    for prompt in random_prompts(6, 13, 80, seed=10):
        prompt = prompt + [1] * 40                             # 41..120 tokens > block_size 32
        vanilla = generate(model, prompt, 60, temperature=0)
        windows.clear()
        speculative = generate_self_speculative(model, prompt, 60, temperature=0)
        window = windows[0]
        two_model = generate_two_model(model, model, prompt, 60, gamma=3, temperature=0)
        assert len(vanilla.tokens) == 60
        assert speculative.tokens == vanilla.tokens == two_model.tokens
        assert window.start > 0
        assert_cache_equals_fresh_prefill(model, prompt + speculative.tokens, window)
        perfect = generate_self_speculative(counting, prompt, 60, temperature=0)
        assert perfect.tokens == [(prompt[-1] + 1 + t) % 13 for t in range(60)]
        assert perfect.stats.summary()['acceptance'] == [1.0] * 3


def test_stop_sequence_ends_generation_and_is_cut_from_the_output():
    model = counting_mtp()
    for decode in (generate, generate_self_speculative):
        run = decode(model, [0], 30, temperature=0, stop=[6, 7])
        assert run.tokens == [1, 2, 3, 4, 5]


def test_speculative_decoding_of_a_one_head_checkpoint_is_an_error():
    with pytest.raises(UserError, match='n_future=1'):
        generate_self_speculative(random_mtp(n_future=1), [1, 2], 5)


# -----------------------------------------------------------------------------
# command lines

def test_cli_decodes_a_checkpoint_and_prints_a_json_summary_last(counting_ckpt, monkeypatch):
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    ckpt = str(counting_ckpt / 'ckpt.pt')
    result = run_cli('sample.py', f'--ckpt={ckpt}', '--prompt=abc', '--max_new_tokens=10',
                     '--speculative=true', '--temperature=0')
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary['mode'] == 'self-speculative'
    assert summary['samples'] == ['defghijklm']
    assert summary['tau'] == 3 and summary['new_tokens'] == 10

    sys.argv = ['sample.py', f'--ckpt={ckpt}', '--tempreature=0']   # restored by monkeypatch
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(os.path.join(REPO, 'sample.py'), run_name='__main__')
    assert str(exit.value.code).startswith("error: unknown option 'tempreature'")
    assert '\n' not in str(exit.value.code)


# (sample.py's arguments after --ckpt=<the counting checkpoint>, a fragment of the message);
# {ckpt}: that checkpoint's path, {other}: the same model with another tokenizer of its size,
# {latin1}: a prompt file that is not UTF-8
SAMPLE_ERRORS = [
    (['--prompt=FILE:{latin1}'], ('latin1.txt', 'not UTF-8')),
    (['--prompt=a', '--temperature=nan'], 'temperature must be a number >= 0'),
    (['--prompt=a', '--draft={other}', '--temperature=0'], ('tokenizer differs', 'chars')),
    (['--prompt='], 'empty prompt'),                   # a char model has no start token
    (['--prompt=xyz'], 'not in the vocabulary'),
    (['--prompt=a', '--max_new_tokens=-3'], 'max_new_tokens'),
    (['--prompt=a', '--top_p=0'], 'top_p'),
    (['--prompt=FILE:/nonexistent'], 'prompt file not found'),
    (['speculative'], 'expected --name=value'),
    (['--prompt=a', '--gamma=two'], 'expects int'),
    (['--prompt=a', '--speculative=true', '--draft={ckpt}'], 'exclusive'),
    (['--prompt=a', '--threads=-1'], 'threads'),
    (['--prompt=ab\\ncd'], r"'\n'"),          # \n in --prompt is a newline, as in --stop
    (['--prompt=a', '--seed=99999999999999999999999'], 'seed must be in -2**63 .. 2**64 - 1'),
]


@pytest.mark.parametrize('args,fragment', SAMPLE_ERRORS,
                         ids=[' '.join(a) for a, _ in SAMPLE_ERRORS])
def test_cli_user_errors(counting_ckpt, tmp_path, args, fragment):
    """Bad prompts, flags and combinations are one-line UserErrors."""
    ckpt = str(counting_ckpt / 'ckpt.pt')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    paths = dict(ckpt=ckpt, other=counting_ckpt / 'other.pt', latin1=tmp_path / 'latin1.txt')
    one_line_error(sample.main, [f'--ckpt={ckpt}', *[a.format(**paths) for a in args]],
                   match=fragment)


def test_a_checkpoint_whose_meta_names_another_tokenizer_than_its_model_is_refused(
        counting_ckpt, tmp_path):
    """A meta that lies (a larger vocabulary than the model's): one line, not an index error."""
    ckpt = load_checkpoint(str(counting_ckpt / 'ckpt.pt'))
    chars = ckpt['meta']['chars'] + 'XYZ'  # three characters more than the model has rows
    ckpt['meta'] = {'kind': 'char', 'chars': chars, 'vocab_size': len(chars)}
    save_checkpoint(ckpt, str(tmp_path / 'liar.pt'))
    one_line_error(sample.main, [f"--ckpt={tmp_path / 'liar.pt'}", '--prompt=XYZ'],
                   match='its meta names another tokenizer than the model')


def test_cli_two_model_decoding_with_a_draft_checkpoint(counting_ckpt, capsys):
    """--draft=<checkpoint>: two-model decoding; the JSON line names the mode."""
    ckpt = f"--ckpt={counting_ckpt / 'ckpt.pt'}"
    summary = sample.main([ckpt, '--prompt=a', '--max_new_tokens=5', '--temperature=0',
                           f"--draft={counting_ckpt / 'ckpt.pt'}", '--gamma=2', '--quiet=true'])
    assert summary['samples'] == ['bcdef'] and summary['acceptance'] == [1.0, 1.0]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['mode'] == 'two-model'


def test_a_distilled_checkpoint_drafts_for_its_source(counting_ckpt):
    """A distilled checkpoint's meta adds source_data (where its real text is): the tokenizer is
    the same, so it is a valid --draft for its source."""
    summary = sample.main([f"--ckpt={counting_ckpt / 'ckpt.pt'}", '--prompt=a', '--quiet=true',
                           '--max_new_tokens=5', '--temperature=0', '--gamma=2',
                           f"--draft={counting_ckpt / 'distilled.pt'}"])
    assert summary['samples'] == ['bcdef'] and summary['acceptance'] == [1.0, 1.0]


def test_a_tiny_temperature_samples_the_greedy_tokens():
    """temperature=1e-45 is sampling from a one-hot at the argmax (not inf - inf = nan)."""
    model = counting_mtp(n_future=3)
    tiny = generate(model, [0], 12, temperature=1e-45, generator=torch.Generator().manual_seed(0))
    assert tiny.tokens == generate(model, [0], 12, temperature=0).tokens
