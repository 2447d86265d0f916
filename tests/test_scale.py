"""Real models and scale-out: GPT-2 weight conversion, torchrun DDP, the CUDA-path flags on CPU.
(The torchrun and torch.compile tests are marked slow.)"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import convert as C

from heads import MTPGPT
import train
from conftest import REPO
from data.prepare import prepare

TINY_RUN = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4',
            '--max_iters=3', '--eval_interval=3', '--eval_iters=1', '--n_future=2',
            '--quiet=true', '--device=cpu']


@pytest.fixture
def words_corpus(tmp_path):
    """A small synthetic char corpus: short words in a random order."""
    g = torch.Generator().manual_seed(0)
    words = ['the cat ', 'a dog ', 'my hat ', 'one sun ', 'big sea ']
    text = ''.join(words[i] for i in torch.randint(len(words), (3000,), generator=g).tolist())
    prepare(text, str(tmp_path / 'data'), 'char')
    return str(tmp_path / 'data')


def test_gpt2_conversion_gives_identical_logits():
    """A random transformers GPT2LMHeadModel, converted by from_pretrained's code path, has the
    same logits as the original (Conv1D weights transposed, GELU tanh, tied unembedding)."""
    transformers = pytest.importorskip('transformers', reason='optional dependency not installed')
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                        vocab_size=61, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random init is tiny; make the weights large enough to matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = C.from_hf(hf).eval()
    x = torch.randint(0, 61, (2, 32))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() < 1e-4
        # and as the NTP head of an MTP model (how train.py / sample.py use it)
        mtp = MTPGPT.from_gpt(ours, n_future=2).eval()
        assert (mtp(x)[0][:, :, 0] - hf(x).logits).abs().max() < 1e-4


def test_from_pretrained_rejects_unknown_model_in_one_line():
    pytest.importorskip('transformers', reason='optional dependency not installed')
    from common import UserError
    with pytest.raises(UserError, match='unknown pretrained model'):
        C.from_pretrained('gpt3')


@pytest.mark.slow
def test_torchrun_ddp_two_processes_on_cpu(words_corpus, tmp_path):
    """2-process torchrun (gloo): loss goes down, both ranks end with identical parameters, and
    only rank 0 writes a checkpoint. Head 3 has loss weight 0 (frozen): DDP must not wait
    for it."""
    out = tmp_path / 'out'
    driver = tmp_path / 'driver.py'
    driver.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {REPO!r})
        import train
        cfg = train.parse_config(sys.argv[1:])
        summary = train.train(cfg)
        rank = int(os.environ['RANK'])
        torch.save({{'params': summary['model'].state_dict(), 'losses': summary['losses'],
                    'val': summary['val_loss']}}, os.path.join({str(tmp_path)!r}, f'rank{{rank}}.pt'))
    """))
    args = [f'--data_dir={words_corpus}', f'--out_dir={out}', '--n_layer=2', '--n_head=2',
            '--n_embd=32', '--block_size=16', '--batch_size=8', '--grad_accum=2',
            '--max_iters=30', '--eval_interval=30', '--eval_iters=2', '--warmup_iters=5',
            '--n_future=3', '--loss_weights=1,1,0', '--quiet=true', '--device=cpu',
            '--learning_rate=3e-3']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                           '--master_port=29533', str(driver), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    for name, p in r0['params'].items():
        assert torch.equal(p, r1['params'][name]), name
    losses = r0['losses']
    assert sum(losses[i] for i in range(26, 31)) < sum(losses[i] for i in range(1, 6))
    assert sorted(os.listdir(out)) == ['ckpt.pt']
    # each rank's own batch RNG is saved, so a resumed run does not give every rank rank 0's
    ranks = torch.load(out / 'ckpt.pt', weights_only=True)['rng']['ranks']
    assert len(ranks) == 2 and not torch.equal(ranks[0]['batches'], ranks[1]['batches'])


def test_cuda_path_flags_are_accepted_on_cpu(words_corpus, tmp_path):
    """--dtype=bfloat16 (CPU autocast) and --compile are accepted on CPU; the default stays fp32
    and the fp32 result does not depend on the flags existing."""
    common = [f'--data_dir={words_corpus}', *TINY_RUN]
    fp32 = train.train(train.parse_config(common + [f'--out_dir={tmp_path}/a']))
    fp32_again = train.train(train.parse_config(common + [f'--out_dir={tmp_path}/b',
                                                          '--dtype=float32']))
    assert fp32['losses'] == fp32_again['losses']
    bf16 = train.train(train.parse_config(common + [f'--out_dir={tmp_path}/c',
                                                    '--dtype=bfloat16']))
    assert all(abs(bf16['losses'][i] - fp32['losses'][i]) < 0.1 for i in fp32['losses'])
    assert bf16['losses'] != fp32['losses']  # autocast really ran in bf16


@pytest.mark.slow
def test_compile_flag_runs_on_cpu_and_matches_eager(words_corpus, tmp_path):
    """--compile=true (torch.compile) trains on CPU to the same losses as eager (fp32)."""
    common = [f'--data_dir={words_corpus}', *TINY_RUN]
    eager = train.train(train.parse_config(common + [f'--out_dir={tmp_path}/e']))
    compiled = train.train(train.parse_config(common + [f'--out_dir={tmp_path}/c',
                                                        '--compile=true']))
    assert all(abs(compiled['losses'][i] - eager['losses'][i]) < 1e-4 for i in eager['losses'])
