"""Specification of marginalize.py: the marginalization estimator and its accuracy table.

Tiny fp32 CPU models (vocab 11, 2 layers, 32 channels, 24-token context). Weights are drawn
with a large std so the next-token distributions are peaked and distinct (no near-ties that
could make two correct implementations choose different candidates).
"""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from common import UserError, save_checkpoint
from metrics import eval_windows, probe_seconds, tree_cost
from drafters import head_scores
from heads import MTPGPT, MTPConfig
import marginalize as M
from conftest import one_line_error, random_mtp, run_cli, tiny_gpt, tiny_mtp

V, BLOCK = 11, 24


def random_tokens(n, seed=1):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def ntp(model, seq):
    """p(next | seq) by a plain uncached forward of the NTP path (trunk + head 1)."""
    return F.softmax(model(seq[None], n_heads=1)[0][0, -1, 0], dim=-1)


@pytest.fixture(scope='module', params=['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def model(request):
    """Of each backbone: GPT-2 and GPT-NeoX (rotary positions: the tree's position ids). The
    GPT-NeoX variants are slow; test_works_on_a_plain_gpt_too keeps one in the fast subset."""
    # (GPT-NeoX at std 0.3 is so peaked that top_p=0.5 keeps one candidate: fewer paths than
    # the chunking checks need)
    std = 0.3 if request.param == 'gpt2' else 0.15
    return random_mtp(vocab=V, n_future=2, block_size=BLOCK, arch=request.param, std=std)


@pytest.fixture(scope='module')
def tokens():
    return random_tokens(BLOCK)


# -----------------------------------------------------------------------------
# the batched estimator is the naive per-path sum

SETTINGS = [dict(top_k=3), dict(top_p=0.7), dict(top_k=4, max_paths=5),
            dict(top_k=2, top_p=0.5, max_paths=3), dict()]


@pytest.mark.parametrize('k_ahead', [2, 3])
@pytest.mark.parametrize('setting', SETTINGS, ids=lambda s: ','.join(f"{k}={v}" for k, v in
                                                                     s.items()) or 'all')
def test_batched_equals_naive_per_path_loop(model, tokens, k_ahead, setting):
    # near the start and at the very end of the window (the last candidates sit at position
    # id block_size - 1); chunk_size 7 splits every level into several chunks
    positions = [0, 1, 5, BLOCK - k_ahead - 1, BLOCK - k_ahead]
    fast = M.marginalize(model, tokens, positions, k_ahead, chunk_size=7, **setting)
    slow = M.marginalize_naive(model, tokens, positions, k_ahead, **setting)
    assert fast.probs.shape == (len(positions), k_ahead, V)
    assert (fast.probs - slow.probs).abs().max() <= 1e-5
    assert (fast.mass - slow.mass).abs().max() <= 1e-5
    assert fast.forwards > k_ahead  # prefill + more than one chunk per level: chunking ran
    assert fast.forwards < slow.forwards / 3  # and far from one forward per path


def test_chunk_size_changes_only_the_cost(model, tokens):
    big = M.marginalize(model, tokens, range(BLOCK - 2), 3, top_k=3, chunk_size=10_000)
    small = M.marginalize(model, tokens, range(BLOCK - 2), 3, top_k=3, chunk_size=5)
    assert (big.probs - small.probs).abs().max() <= 1e-5
    assert big.forwards == 3  # prefill, then one forward per level
    assert small.forwards > 10


@pytest.mark.parametrize('k_ahead,top_k,max_paths', [(2, 0, 0), (2, 3, 0), (3, 3, 0), (3, 0, 20)])
def test_tree_cost_bounds_the_work_and_is_exact_for_k_ahead_2(model, tokens, k_ahead, top_k,
                                                               max_paths):
    """tree_cost, the up-front estimate (the progress bar's total, the --max_forward_tokens
    check): an upper bound of the tokens and chunk forwards after the cached one, exact at
    k_ahead=2 (k_ahead=3 chunks share ancestors)."""
    positions = torch.arange(len(tokens) - k_ahead)
    est = M.marginalize(model, tokens, positions, k_ahead, top_k, max_paths=max_paths,
                        chunk_size=16)
    bound = tree_cost(len(positions), k_ahead, top_k, max_paths, V, chunk_size=16)
    done = (est.forward_tokens - len(tokens), est.forwards - 1)
    assert done == bound if k_ahead == 2 else all(d <= b for d, b in zip(done, bound))


def test_works_on_a_plain_gpt_too(tokens, arch):
    gpt = tiny_gpt(seed=0, vocab_size=V, n_layer=2, n_head=2, block_size=BLOCK, arch=arch)
    fast = M.marginalize(gpt, tokens, [3, 20], 3, top_k=3, chunk_size=4)
    slow = M.marginalize_naive(gpt, tokens, [3, 20], 3, top_k=3)
    assert (fast.probs - slow.probs).abs().max() <= 1e-5


# -----------------------------------------------------------------------------
# what the estimate is

@torch.no_grad()
def test_without_sparsification_k2_is_the_exact_sum_over_all_v(model, tokens):
    positions = [0, 7, BLOCK - 2]
    est = M.marginalize(model, tokens, positions, k_ahead=2)  # top_k=0, top_p=1: all of V
    for i, t in enumerate(positions):
        prefix = tokens[:t + 1]
        p1 = ntp(model, prefix)
        exact = sum(p1[v] * ntp(model, torch.cat([prefix, torch.tensor([v])])) for v in range(V))
        assert (est.probs[i, 1] - exact).abs().max() <= 1e-5
        assert abs(float(est.probs[i, 1].sum()) - 1) <= 1e-5
        assert abs(float(est.mass[i, 1]) - 1) <= 1e-5


def test_sparsified_estimate_sums_to_captured_mass_or_to_one_renormalized(model, tokens):
    positions = list(range(BLOCK - 3))
    for setting in (dict(top_k=2), dict(top_p=0.6), dict(top_k=3, max_paths=4)):
        est = M.marginalize(model, tokens, positions, 3, **setting)
        assert (est.probs.sum(-1) - est.mass).abs().max() <= 1e-5
        assert est.mass[:, 1:].max() < 1 - 1e-3  # something was dropped: the test can fail
        assert (est.mass[:, 2] <= est.mass[:, 1] + 1e-6).all()  # paths only lose mass
        renorm = M.marginalize(model, tokens, positions, 3, renormalize=True, **setting)
        assert (renorm.probs.sum(-1) - 1).abs().max() <= 1e-5
        assert (renorm.probs * est.mass[:, :, None] - est.probs).abs().max() <= 1e-5
    # for k = 2 the captured mass is the sum of the kept candidates' NTP probabilities
    est = M.marginalize(model, tokens, positions, 2, top_k=2)
    top2 = est.probs[:, 0].topk(2, dim=-1).values.sum(-1)
    assert (est.mass[:, 1] - top2).abs().max() <= 1e-6


def test_k_ahead_1_returns_the_ntp_distribution(model, tokens):
    positions = [0, 9, BLOCK - 1]
    est = M.marginalize(model, tokens, positions, k_ahead=1, top_k=1)
    assert est.probs.shape == (3, 1, V)
    for i, t in enumerate(positions):
        assert (est.probs[i, 0] - ntp(model, tokens[:t + 1])).abs().max() <= 1e-5
    assert (est.mass == 1).all()
    assert est.forwards == 1  # the prefill alone


def test_candidates_are_top_k_and_the_smallest_top_p_set():
    dist = torch.tensor([[0.05, 0.5, 0.2, 0.25]])
    assert M.candidate_mask(dist, top_k=2).tolist() == [[False, True, False, True]]
    assert M.candidate_mask(dist, top_p=0.5).tolist() == [[False, True, False, False]]
    assert M.candidate_mask(dist, top_p=0.7).tolist() == [[False, True, False, True]]
    assert M.candidate_mask(dist, top_p=0.76).tolist() == [[False, True, True, True]]
    assert M.candidate_mask(dist, top_k=2, top_p=0.9).tolist() == [[False, True, False, True]]
    assert M.candidate_mask(dist).all()


# -----------------------------------------------------------------------------
# the accuracy table

HAND_BUILT = [0.30, 0.20, 0.15, 0.12, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.005]


def fixed_distribution_model(n_future=2):
    """A real MTPGPT whose every head predicts HAND_BUILT at every position, whatever the input:
    all weights zero except the final LayerNorm's bias e_0 (its gain is zero, so its output is
    e_0 always) and column 0 of the tied unembedding, which holds the log-probabilities."""
    model = MTPGPT(MTPConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK,
                             n_future=n_future, bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = torch.tensor(HAND_BUILT).log()
    return model


def test_accuracy_is_exact_on_a_hand_built_distribution():
    model = fixed_distribution_model(n_future=2)
    tokens = random_tokens(70, seed=3).numpy()
    tokens[[1, 2]], tokens[[-2, -1]] = 7, 0  # so x_{t+1}, x_{t+2}, x_{t+3} score differently
    k_ahead = 3
    # every row ranks the tokens like HAND_BUILT: top-1 = {0}, top-5 = {0, .., 4}
    ts = range(len(tokens) - k_ahead)  # every position that has all three targets
    expect1 = [np.mean([tokens[t + k] == 0 for t in ts]) for k in (1, 2, 3)]
    expect5 = [np.mean([tokens[t + k] < 5 for t in ts]) for k in (1, 2, 3)]
    assert len(set(expect1)) == 3 and len(set(expect5)) == 3  # an off-by-one would show
    rows = M.evaluate_table(model, tokens, positions=10_000, k_ahead=k_ahead, top_ks=[1, 2, 0])
    assert [r['method'] for r in rows] == ['marginal'] * 3 + ['heads']
    for r in rows:
        assert r['n'] == [len(ts)] * 3 if r['method'] == 'marginal' else [len(ts)] * 2 + [0]
        assert r['top1'][:2] == pytest.approx(expect1[:2], abs=1e-12)
        assert r['top5'][:2] == pytest.approx(expect5[:2], abs=1e-12)
    for r in rows[:3]:
        assert r['top1'] == pytest.approx(expect1, abs=1e-12)
        assert r['top5'] == pytest.approx(expect5, abs=1e-12)
    heads = rows[3]
    assert heads['top1'][2] is None and heads['top5'][2] is None  # no head 3
    assert heads['mass'] is None
    greedy, top2, exact = rows[:3]
    assert greedy['mass'] == pytest.approx([1, 0.3, 0.09], abs=1e-5)
    assert top2['mass'] == pytest.approx([1, 0.5, 0.25], abs=1e-5)
    assert exact['mass'] == pytest.approx([1, 1, 1], abs=1e-5)
    assert greedy['forward_tokens'] < top2['forward_tokens'] < exact['forward_tokens']


def test_positions_without_targets_are_excluded_not_wrapped(model):
    n_tokens, window, k_ahead = 60, BLOCK, 3
    windows = eval_windows(n_tokens, window, k_ahead, positions=10_000, seed=5)
    seen = sorted(start + i for start, n in windows for i in range(n))
    assert seen == list(range(n_tokens - k_ahead))  # every position with a target, once
    for start, n in windows:
        assert n + k_ahead <= window and start + n - 1 + k_ahead <= n_tokens - 1
    assert sum(n for _, n in eval_windows(n_tokens, window, k_ahead, 20, seed=5)) == 20
    rows = M.evaluate_table(model, random_tokens(n_tokens).numpy(), positions=10_000,
                            k_ahead=k_ahead, top_ks=[1])
    assert rows[0]['n'] == [n_tokens - k_ahead] * k_ahead
    # the estimator refuses positions whose candidates would need position ids >= block_size
    tokens = random_tokens(BLOCK)
    M.marginalize(model, tokens, [BLOCK - 3], k_ahead=3)
    with pytest.raises(UserError, match='block_size'):
        M.marginalize(model, tokens, [BLOCK - 2], k_ahead=3)
    with pytest.raises(UserError):
        M.marginalize(model, tokens, [BLOCK], k_ahead=1)


# -----------------------------------------------------------------------------
# the command line

def write_checkpoint(tmp_path, text, n_future=2):
    chars = ''.join(sorted(set(text)))
    torch.manual_seed(0)
    model = MTPGPT(MTPConfig(vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32,
                             block_size=BLOCK, n_future=n_future))
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                         meta={'kind': 'char', 'chars': chars, 'vocab_size': len(chars)},
                         config=dict(dataset='tiny', data_dir=str(tmp_path)), iter_num=0), path)
    return path, chars


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path):
    text = 'the cat sat on the mat. ' * 10
    ckpt, chars = write_checkpoint(tmp_path, text, n_future=2)
    (tmp_path / 'in.txt').write_text(text)
    out = run_cli('marginalize.py', f'--ckpt={ckpt}', f'--input={tmp_path / "in.txt"}', '--positions=30',
                  '--k_ahead=2', '--top_k=1,3,all', '--quiet=1')
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    names = [r['name'] for r in result['rows']]
    assert names == ['greedy (top_k=1)', 'top_k=3', 'all V (exact)', 'MTP heads (n_future=2)']
    assert result['positions'] == 30
    for r in result['rows']:
        assert r['n'] == [30, 30] and len(r['top1']) == len(r['top5']) == 2
        assert all(0 <= a <= 1 for a in r['top1'] + r['top5'])
    assert result['rows'][2]['mass'] == pytest.approx([1, 1], abs=1e-5)
    assert 'top-5' in out.stdout and 'fwd tokens' in out.stdout  # the table precedes the JSON


def test_cli_reads_the_val_split_of_the_checkpoints_data(tmp_path):
    text = 'abcabcabd' * 10
    ckpt, chars = write_checkpoint(tmp_path, text, n_future=1)
    np.array([chars.index(c) for c in text], dtype=np.uint16).tofile(tmp_path / 'val.bin')
    sys_argv = [f'--ckpt={ckpt}', '--positions=10', '--top_k=2', '--quiet=1']
    result = M.main(sys_argv)  # in-process: reads data_dir/val.bin named by the checkpoint
    assert result['data'] == str(tmp_path / 'val.bin')
    assert [r['method'] for r in result['rows']] == ['marginal']  # n_future=1: no heads row


def test_positions_beyond_the_data_are_said_not_silently_capped(tmp_path, capsys):
    ckpt, _ = write_checkpoint(tmp_path, 'abcd', n_future=1)
    np.array([0, 1, 2, 3] * 5, dtype=np.uint16).tofile(tmp_path / 'val.bin')  # 20 tokens
    result = M.main([f'--ckpt={ckpt}', '--positions=500', '--k_ahead=2', '--top_k=1', '--quiet=1'])
    assert "note: --positions=500, but only 18 positions" in capsys.readouterr().out
    assert result['positions'] == 18


def test_the_time_estimate_prices_the_heads_row_by_position():
    """The MTP heads' row is a loop over positions: it costs time even where no path does."""
    tokens = random_tokens(BLOCK).tolist()
    mtp, gpt = random_mtp(vocab=V, n_future=3, block_size=BLOCK), tiny_gpt(vocab_size=V)
    assert probe_seconds(gpt, tokens, chunk_size=512, chunks=0, n=10_000) == 0
    assert probe_seconds(mtp, tokens, chunk_size=512, chunks=0, n=10_000) > 0


# (marginalize.py's arguments after --ckpt=<a checkpoint>, a fragment of the message);
# {tmp}: the test's directory: the checkpoint's val.bin, latin1.txt (not UTF-8), empty/val.bin
MARGINALIZE_ERRORS = [
    (['--input={tmp}/latin1.txt'], ('latin1.txt', 'not UTF-8')),
    (['--data_dir={tmp}/empty'], ('val.bin', 'is empty')),
    # all of V at k_ahead=3: refused up front, naming the cost and the flag to override
    (['--top_k=all', '--k_ahead=3', '--max_forward_tokens=1000'],
     ('needs up to', 'forward tokens', 'raise --max_forward_tokens')),
    # a timed probe prices the table (paths, and the heads' row: a loop over positions)
    (['--top_k=1', '--max_seconds=1e-9'], ('about', 'timed probe', 'raise --max_seconds')),
    (['--input={tmp}/short.txt'], 'need more than k_ahead=3 tokens, got 1'),
    (['--nope=1'], 'unknown option'),
    (['--top_k=x'], 'top_k'),
    (['--ckpt='], '--ckpt=PATH is required'),
    (['--positions=0'], 'positions'),
    (['--k_ahead=0'], 'k_ahead'),
    (['--top_p=0'], 'top_p'),
]


@pytest.mark.parametrize('args,fragment', MARGINALIZE_ERRORS,
                         ids=[' '.join(a) for a, _ in MARGINALIZE_ERRORS])
def test_bad_flags_are_one_line_user_errors(tmp_path, args, fragment):
    ckpt, _ = write_checkpoint(tmp_path, 'abcabcabd', n_future=1)
    np.array([0, 1, 2, 0, 1, 3] * 8, dtype=np.uint16).tofile(tmp_path / 'val.bin')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 abc'.encode('latin-1'))
    (tmp_path / 'short.txt').write_text('a')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'val.bin').write_bytes(b'')
    one_line_error(M.main, [f'--ckpt={ckpt}', *[a.format(tmp=tmp_path) for a in args]],
                   match=fragment)


def test_cli_prints_a_bad_flag_as_one_line(tmp_path):
    ckpt, _ = write_checkpoint(tmp_path, 'abcabcabd', n_future=1)
    out = run_cli('marginalize.py', f'--ckpt={ckpt}', '--k_ahead=two')
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["error: --k_ahead expects int, got 'two'"]
    assert one_line_error(out) == "error: --k_ahead expects int, got 'two'"


def test_the_sequential_heads_row_reads_greedy_guesses_not_the_true_tokens():
    """A sequential head k reads x_{t+k-1}; in the accuracy table (x_{t+k} from x<=t alone) it
    reads the chain's own greedy guesses, as when drafting: head 2 at t gives what it gives on
    the sequence x<=t followed by head 1's argmax at t, not what it gives on the true x_{t+1}."""
    model = tiny_mtp(n_future=3, head_type='sequential')
    seq = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(0))
    scores = head_scores(model, seq, 10)
    with torch.no_grad():
        forced = model(seq[None])[0][0]
        for t in (0, 4, 9):
            guessed = torch.cat([seq[:t + 1], forced[t, 0].argmax().view(1)])
            want = model(guessed[None])[0][0, t, 1]
            assert torch.allclose(scores[t, 1], want, atol=1e-5)
            assert torch.allclose(scores[t, 0], forced[t, 0], atol=1e-5)
            if guessed[-1] != seq[t + 1]:
                assert not torch.allclose(scores[t, 1], forced[t, 1], atol=1e-3)
