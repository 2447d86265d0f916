"""Shared tiny fixtures for the nanoMTP test suite.

Everything here is CPU, fp32 and tiny (2 layers, 32 channels, 16-token context) so the whole
suite runs in seconds. Helpers:

  REPO, SHARED        the repository root and ../shared
  tiny_config(...)    a GPTConfig for a tiny model
  tiny_gpt(...)       a seeded tiny model.GPT in eval mode
  make_corpus(...)    write train.bin / val.bin / meta.json with data.prepare.prepare
  pattern_text(...)   a synthetic corpus: random choice among a few fixed 8-letter words, so
                      inside a word x_{t+1} and x_{t+2} are determined by x_t
  run_train(...)      train.train(train.parse_config([...])) with tiny, quiet, CPU defaults
"""
import os
import random
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
if REPO not in sys.path:
    sys.path.insert(0, REPO)
if os.path.isdir(os.path.join(SHARED, 'tiktoken')):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED, 'tiktoken'))

# Tiny models are much faster single-threaded, and the CI machines are shared.
torch.set_num_threads(1)

import model as M  # noqa: E402
import train as T  # noqa: E402
from data.prepare import prepare  # noqa: E402

LETTERS = 'abcdefghijklmnopqrstuvwxyzABCDEF'
WORDS = [LETTERS[i * 8:(i + 1) * 8] for i in range(4)]  # 4 words, 32 distinct characters


def tiny_config(**kw):
    args = dict(block_size=32, vocab_size=40, n_layer=3, n_head=4, n_embd=32, dropout=0.0,
                bias=False)
    args.update(kw)
    return M.GPTConfig(**args)


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return M.GPT(tiny_config(**kw)).eval()


def pattern_text(n_words=2500, seed=0):
    rng = random.Random(seed)
    return ''.join(rng.choice(WORDS) for _ in range(n_words))


def make_corpus(out_dir, text, tokenizer='char'):
    prepare(text, str(out_dir), tokenizer)
    return str(out_dir)


TINY_FLAGS = ['--quiet=true', '--device=cpu', '--dtype=float32', '--compile=false',
              '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=8',
              '--n_future=2', '--eval_iters=2', '--warmup_iters=2', '--learning_rate=1e-2',
              '--min_lr=1e-3', '--log_interval=1000', '--head_type=block']


def train_config(data_dir, out_dir, *flags):
    return T.parse_config(TINY_FLAGS + [f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                                        *flags])


def run_train(data_dir, out_dir, *flags):
    """A tiny in-process training run; returns train.train's summary dict."""
    return T.train(train_config(data_dir, out_dir, *flags))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
    """A prepared char corpus of random 8-letter words (vocab 32)."""
    return make_corpus(tmp_path_factory.mktemp('corpus'), pattern_text())


@pytest.fixture(scope='session')
def ntp_ckpt(corpus, tmp_path_factory):
    """A briefly trained next-token (n_future=1) checkpoint to adapt from."""
    out = tmp_path_factory.mktemp('ntp')
    run_train(corpus, out, '--n_future=1', '--max_iters=10', '--eval_interval=10')
    return os.path.join(str(out), 'ckpt.pt')
