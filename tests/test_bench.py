"""Specification of bench.py: one section per question (decode, train, marginalize), each ending
with a JSON line, and one-line errors for a bad section or bad flags."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import convert as C

import bench
from dataclasses import asdict
from common import UserError, load_checkpoint, save_checkpoint
from conftest import REPO, counting_mtp, one_line_error, random_mtp
from heads import MTPGPT
from sample import generate


# -----------------------------------------------------------------------------
# decode: vanilla vs self-speculative vs two-model on the same prompts

def test_bench_decode_compares_modes_and_ends_with_a_json_line(counting_ckpt, capsys):
    ckpt = counting_ckpt / 'ckpt.pt'
    summary = bench.main(['decode', f'--ckpt={ckpt}', f'--draft={ckpt}', '--gamma=2',
                          '--num_prompts=2', '--prompt_len=8', '--max_new_tokens=7',
                          '--repeats=1'])
    for mode in ('self', 'draft'):
        assert summary['greedy'][mode]['identical'] is True
        assert summary['greedy'][mode]['tau'] == 3            # perfect drafts: 3 tokens a step
        assert summary['greedy'][mode]['speedup'] > 0
    assert summary['sampling']['vanilla']['tau'] == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['section'] == 'decode'


@pytest.mark.slow
def test_bench_decode_batch_sizes_compares_batched_modes_and_plots(counting_ckpt, tmp_path):
    """--batch_sizes: batched vanilla, self-speculative and two-model decoding at each batch
    size on the same prompts (greedy: every row emits vanilla's tokens), per-row tau, the step
    breakdown, a PNG of tokens/s against batch size; --peers: transformers' batched generate."""
    pytest.importorskip('transformers')
    ckpt = counting_ckpt / 'ckpt.pt'
    summary = bench.main(['decode', f'--ckpt={ckpt}', f'--draft={ckpt}', '--gamma=2',
                          '--batch_sizes=1,2', '--num_prompts=3', '--prompt_len=8',
                          '--max_new_tokens=7', '--repeats=1', '--breakdown=true',
                          '--peers=true', f"--plot={tmp_path / 'batched.png'}"])
    assert summary['num_prompts'] == 3 and set(summary['batched']) == {1, 2}
    for rows in summary['batched'].values():
        assert set(rows) == {'vanilla', 'self', 'draft', 'hf', 'ms_per_token'}
        for mode in ('self', 'draft', 'hf'):
            assert rows[mode]['identical'] is True and rows[mode]['speedup'] > 0
        assert rows['self']['tau'] == 3 and rows['draft']['tau'] == 3 and rows['hf']['tau'] == 1
        assert rows['ms_per_token']['self']['drafts'] > 0
    assert summary['batched'][2]['vanilla']['target_forwards'] == 7 * 2  # 2 batches of 7 steps
    assert (tmp_path / 'batched.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_bench_decode_rows_of_other_heads_and_of_transformers_peers(counting_ckpt, tmp_path):
    """--heads adds a self-speculative row per checkpoint of the same next-token model; --peers
    adds transformers' generate, prompt lookup and assisted generation on the same weights
    (convert.to_hf): greedy, every row emits vanilla's tokens, and each is counted like ours.
    --breakdown splits our modes' time per token into forward, drafts, verify and the rest."""
    pytest.importorskip('transformers')
    ckpt = counting_ckpt / 'ckpt.pt'
    seq_dir = tmp_path / 'seq'
    model = MTPGPT.from_gpt(counting_mtp(n_future=3), n_future=3, head_type='sequential')
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                         meta=load_checkpoint(str(ckpt))['meta'], config={}),
                    str(seq_dir / 'ckpt.pt'))
    summary = bench.main(['decode', f'--ckpt={ckpt}', f"--heads={seq_dir / 'ckpt.pt'}",
                          '--peers=true', f'--assistant={ckpt}', '--num_prompts=2',
                          '--prompt_len=8', '--max_new_tokens=12', '--repeats=1',
                          '--breakdown=true'])
    greedy = summary['greedy']
    assert set(greedy) == {'vanilla', 'self', 'self:seq', 'hf', 'hf-lookup', 'hf-assist'}
    assert all(row['identical'] for row in greedy.values())
    assert greedy['self']['tau'] > 2.5 and greedy['hf']['tau'] == 1   # perfect drafts; plain
    assist = greedy['hf-assist']  # a perfect assistant: the target verifies long runs of drafts
    assert assist['draft_forwards'] > 0
    assert assist['target_forwards'] < greedy['hf']['target_forwards']
    assert summary['sampling']['hf-lookup']['tokens_per_s'] > 0
    parts = summary['greedy_ms_per_token']  # --breakdown: ours only, parts of the step time
    assert set(parts) == {'vanilla', 'self', 'self:seq'}
    assert parts['self:seq']['drafts'] > 0 and parts['vanilla']['drafts'] == 0
    for row in parts.values():
        assert row['forward'] > 0 and row['total'] == pytest.approx(
            row['forward'] + row['drafts'] + row['verify'] + row['rest'])


def test_transformers_rows_decode_prompts_that_hold_the_pad_id():
    """transformers' generate() masks out every pad_token_id of a prompt unless it is given an
    attention mask; here token 0 is a real token (a char model's newline)."""
    pytest.importorskip('transformers')
    model = random_mtp(n_future=1, block_size=32)
    decode = bench.transformers_decoder(C.to_hf(model), 12)
    for prompt in ([0, 5, 0, 0, 7, 0], [3, 0, 9]):
        assert decode(prompt).tokens == generate(model, prompt, 12, temperature=0).tokens


def test_bench_decode_refuses_heads_of_another_next_token_model(counting_ckpt, tmp_path):
    other = tmp_path / 'other.pt'
    model = counting_mtp(n_future=3, noise=0.2, seed=1)
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                         meta=load_checkpoint(str(counting_ckpt / 'ckpt.pt'))['meta'],
                         config={}), str(other))
    with pytest.raises(UserError, match='another next-token model'):
        bench.main(['decode', f"--ckpt={counting_ckpt / 'ckpt.pt'}", f'--heads={other}',
                    '--num_prompts=1', '--prompt_len=8', '--max_new_tokens=4', '--repeats=1'])


# -----------------------------------------------------------------------------
# marginalize: the batched estimator against the naive one

def test_naive_vs_batched_reports_agreement_and_cost():
    """naive_vs_batched runs marginalize_naive and marginalize on the same positions: they
    agree (1e-5), and the batched one needs far fewer forwards than one per path."""
    model = random_mtp(vocab=11, n_future=2, block_size=24)
    tokens = torch.randint(0, 11, (40,), generator=torch.Generator().manual_seed(1))
    result = bench.naive_vs_batched(model, tokens.numpy(), positions=12, k_ahead=2, top_k=8)
    assert result['positions'] == 12
    assert result['max_abs_diff'] <= 1e-5
    assert result['batched_forwards'] < result['naive_forwards'] == 12 * (1 + 8)
    assert result['speedup'] > 0


def test_bench_marginalize_on_a_checkpoint_ends_with_a_json_line(counting_ckpt, capsys):
    """`bench.py marginalize --ckpt=...` (what marginalize.py --bench was): the checkpoint's
    val.bin, both estimators, their agreement, a JSON line last."""
    summary = bench.main(['marginalize', f"--ckpt={counting_ckpt / 'ckpt.pt'}",
                          '--positions=8', '--k_ahead=2', '--top_k=3', '--device=cpu'])
    assert summary['section'] == 'marginalize' and summary['positions'] == 8
    assert summary['data'] == str(counting_ckpt / 'val.bin')
    assert summary['max_abs_diff'] <= 1e-5
    assert summary['naive_forwards'] == 8 * (1 + 3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(
        json.dumps(summary))


# -----------------------------------------------------------------------------
# train: train.py's step, each variant in its own process

@pytest.mark.slow
def test_train_benchmark_compares_variants_and_ends_with_json():
    """bench.py train: one row per variant, ratios to the base, the JSON line last."""
    proc = subprocess.run([sys.executable, 'bench.py', 'train', '--n_layer=1', '--n_embd=32',
                           '--n_head=2', '--block_size=16', '--batch_size=2', '--iters=2',
                           '--warmup=1', '--compare=n_future=1;memory_efficient=true'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r['variant'] for r in summary['rows']] == ['base', 'n_future=1',
                                                       'memory_efficient=true']
    assert summary['rows'][0]['time_ratio'] == 1.0
    assert summary['rows'][1]['params'] < summary['rows'][0]['params']  # fewer heads
    assert all(r['ms_per_iter'] > 0 and r['peak_mb'] > 0 for r in summary['rows'])


# -----------------------------------------------------------------------------
# bad input

# (bench.py's arguments, a fragment of the one-line message); {ckpt}: a checkpoint (vocab 13),
# {other}: the same model with another tokenizer of that size; token files: {bpe} with ids
# beyond 13, {txt} a text file, {empty} an empty file
BENCH_ERRORS = [
    (['decode', '--ckpt={ckpt}', '--draft={other}'], ('tokenizer differs', 'chars')),
    (['decode', '--ckpt={ckpt}', '--data={bpe}'], ('bpe.bin', "beyond the model's vocab_size 13")),
    (['decode', '--ckpt={ckpt}', '--data={txt}'], ('text.txt', "beyond the model's vocab_size")),
    (['decode', '--ckpt={ckpt}', '--data={empty}'], ('empty.bin', 'is empty')),
    (['train', '--vocab_size=0'], 'vocab_size must be in 1..65536'),
    (['train', '--vocab_size=70000'], 'vocab_size must be in 1..65536'),
    (['train', '--iters=0'], '--iters must be >= 1'),
    (['no_such_section'], 'usage'),
    ([], 'usage'),
    (['decode', '--ckpt={ckpt}', '--nope=1'], 'unknown option'),
    (['decode', '--ckpt={ckpt}', '--repeats=0'], 'repeats'),
    (['decode', '--ckpt={ckpt}', '--batch_sizes=a'], '--batch_sizes must be positive integers'),
    (['decode', '--ckpt={ckpt}', '--batch_sizes=2,0'], '--batch_sizes must be positive'),
    (['decode', '--ckpt={ckpt}', '--plot=x.png'], 'add --batch_sizes'),
    (['decode', '--ckpt={ckpt}', '--assistant={ckpt}'], 'add --peers=true'),
    (['decode', '--ckpt={ckpt}', '--assistant={other}', '--peers=true', '--prompt_len=8',
      '--max_new_tokens=8'], "the assistant checkpoint's tokenizer differs"),
    (['train', '--iters=two'], 'expects int'),
    (['train', '--compare=n_future=2;nope=1'], 'unknown option'),  # before any variant runs
    (['marginalize', '--ckpt={ckpt}', '--positions=0'], 'positions'),
    (['marginalize', '--ckpt={ckpt}', '--top_k=3,5'], 'top_k'),       # a single setting
    (['marginalize', '--ckpt={ckpt}', '--top_p=0'], 'top_p must be in (0, 1]'),
    (['train', '--doc_len=8'], 'unknown option'),                     # not a benchmark flag
]


@pytest.mark.parametrize('args,fragment', BENCH_ERRORS, ids=[' '.join(a) for a, _ in BENCH_ERRORS])
def test_bad_section_or_flags_are_one_line_user_errors(counting_ckpt, tmp_path, args, fragment):
    np.array([50000, 3, 50256] * 30, dtype=np.uint16).tofile(tmp_path / 'bpe.bin')
    (tmp_path / 'text.txt').write_text('some text\n' * 20)
    (tmp_path / 'empty.bin').write_bytes(b'')
    paths = dict(ckpt=counting_ckpt / 'ckpt.pt', other=counting_ckpt / 'other.pt',
                 bpe=tmp_path / 'bpe.bin', txt=tmp_path / 'text.txt', empty=tmp_path / 'empty.bin')
    one_line_error(bench.main, [a.format(**paths) for a in args], match=fragment)


def test_bench_decode_takes_prompts_longer_than_the_window(counting_ckpt):
    """A prompt over block_size slides (as in sample.py); the bench compares its last window."""
    summary = bench.main(['decode', f"--ckpt={counting_ckpt / 'ckpt.pt'}", '--prompt_len=70',
                          '--num_prompts=1', '--max_new_tokens=3', '--repeats=1'])
    assert summary['greedy']['self']['identical'] is True and summary['prompt_len'] == 70
