"""The nanoMTP test suite's shared fixtures and helpers: the only place they are defined.

Everything here is CPU, fp32 and tiny (2-3 layers, 32 channels) so the suite runs in seconds.
`python -m pytest tests -m "not slow"` leaves out the few tests marked slow (torch.compile,
torchrun, bench.py subprocesses); CI runs everything.

  REPO, SHARED          the repository root and ../shared
  architectures         ARCHS: 'gpt2' (the defaults) and 'neox' (GPT-NeoX / Pythia in miniature:
                        rotary on 1/4 of each head, parallel residual, untied, biases, exact
                        GELU); the `arch` fixture runs a test on both, and every tiny model
                        below takes arch=...
  tiny models           tiny_config(...) a GPTConfig; tiny_gpt(...) a seeded model.GPT;
                        tiny_mtp(...) a seeded heads.MTPGPT of the same shape (default init);
                        random_mtp(...) an MTPGPT with a large random init (peaked, distinct
                        next-token distributions; its heads are untrained);
                        counting_mtp(...) hand-set weights: token x+1 follows x, head k predicts
                        x+k (perfect drafts)
  sampling oracles      exact_vanilla_distribution (P of the first tokens, enumerated),
                        total_variation, N_RUNS and TV_BOUND, tiny_vocab_model (3 tokens),
                        and two wrong acceptance rules, the negative controls
  corpora, training     pattern_text, make_corpus, local_tokenizer (a Hugging Face tokenizer
                        directory), run_train, train_config; fixtures corpus
                        (random 8-letter words), ntp_ckpt (a trained next-token checkpoint),
                        neox_ntp_ckpt (its GPT-NeoX twin), source_ckpt (either, per arch),
                        counting_ckpt (counting_mtp saved with a char tokenizer and a val.bin)
  command lines         run_cli(script, *args) runs a script in a fresh process;
                        one_line_error(...) asserts an error reaches the user as one line
"""
import os
import random
import resource
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
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
from common import UserError, save_checkpoint  # noqa: E402
from heads import MTPGPT, MTPConfig  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.text import load_meta  # noqa: E402
from decoding import probs_from_logits  # noqa: E402


# -----------------------------------------------------------------------------
# architectures

# GPTConfig options of each backbone: GPT-2 is the default; GPT-NeoX is Pythia in miniature
ARCHS = {'gpt2': {}, 'neox': dict(rotary_pct=0.25, parallel_residual=True, tie_embeddings=False,
                                  gelu='none', bias=True)}


@pytest.fixture(params=list(ARCHS))
def arch(request):
    """Runs a test once per backbone: 'gpt2' and 'neox'."""
    return request.param


# -----------------------------------------------------------------------------
# tiny models

def tiny_config(arch='gpt2', **kw):
    """A GPTConfig: 3 layers, 4 heads, 32 channels, vocab 40, 32 positions, the options of
    ARCHS[arch] (kw override)."""
    args = dict(block_size=32, vocab_size=40, n_layer=3, n_head=4, n_embd=32, dropout=0.0,
                bias=False)
    args.update(ARCHS[arch], **kw)
    return M.GPTConfig(**args)


def tiny_gpt(seed=0, arch='gpt2', **kw):
    """A seeded model.GPT of tiny_config(arch, **kw), in eval mode."""
    torch.manual_seed(seed)
    return M.GPT(tiny_config(arch, **kw)).eval()


def tiny_mtp(n_future=3, seed=0, arch='gpt2', **kw):
    """A seeded MTPGPT of tiny_config's shape with n_future heads, in eval mode; kw sets any
    GPTConfig or MTPConfig field (whs, attach_layer, head_type, bias, ...); block heads unless
    kw says otherwise, and sequential heads with attention (the designs with the most state)."""
    torch.manual_seed(seed)
    kw = {'head_type': 'block', 'head_attention': True, **kw}
    return MTPGPT(MTPConfig(**{**tiny_config(arch).__dict__, **kw}, n_future=n_future)).eval()


def random_mtp(vocab=13, n_future=4, seed=0, n_layer=2, block_size=64, std=0.3,
               head_type='block', arch='gpt2', head_attention=True):
    """An MTPGPT (2 heads of attention, 32 channels) whose matrices are drawn with a large std:
    peaked, distinct next-token distributions (no near-ties); its MTP heads are untrained, so
    their drafts are mostly rejected."""
    torch.manual_seed(seed)
    model = MTPGPT(MTPConfig(vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=32,
                             block_size=block_size, n_future=n_future, head_type=head_type,
                             head_attention=head_attention, **ARCHS[arch]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


def counting_mtp(vocab=13, n_future=4, wrong=(), noise=0.01, seed=0, block_size=64,
                 head_type='block', arch='gpt2'):
    """Every token is the previous one + 1 (mod vocab); head i predicts x + i, except that for
    (i, x) in `wrong` it predicts x + i + 1. Each head's MLP maps the one-hot embedding of x to
    that of its target; the attention outputs are zeroed. A little noise on every weight keeps
    attention and positions in play (the cache holds real, position-dependent keys and values)
    without moving any argmax. head_type='sequential': head 1 is the trunk (its last MLP maps x
    to x + 1) and head i >= 2 maps the token it reads, x_{t+i-1}, to x_{t+i-1} + 1 (with `wrong`
    keyed by that token: (i, y) drafts y + 2)."""
    torch.manual_seed(seed)
    model = MTPGPT(MTPConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32,
                             block_size=block_size, n_future=n_future, head_type=head_type,
                             head_attention=True, **ARCHS[arch]))
    sequential = head_type == 'sequential'
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, noise)
        model.transformer.wte.weight[:, :vocab] += torch.eye(vocab)   # tied: logits_v = LN(h)_v
        if model.lm_head.weight is not model.transformer.wte.weight:  # untied (neox): the same
            model.lm_head.weight[:, :vocab] += torch.eye(vocab)
        head_blocks = [None] + [head.block for head in model.heads] if sequential \
            else [head.blocks[0] for head in model.heads]
        for block in list(model.transformer.h) + [b for b in head_blocks if b is not None]:
            block.attn.c_proj.weight.mul_(0.0)
            block.mlp.c_proj.weight.mul_(0.0)
        if sequential:  # head 1: the trunk's last block; head i >= 2 reads its token x_{t+i-1}
            head_blocks[0] = model.transformer.h[-1]
            for head in model.heads:
                head.combine.weight[:, 32:] += 0.2 * torch.eye(32)
        for i, block in enumerate(head_blocks, start=1):
            mlp, step = block.mlp, 1 if sequential else i
            mlp.c_fc.weight[:vocab, :vocab] += torch.eye(vocab)   # hidden unit x fires for token x
            for x in range(vocab):
                target = (x + step + ((i, x) in wrong)) % vocab
                mlp.c_proj.weight[target, x] += 2.0
    return model.eval()


# -----------------------------------------------------------------------------
# sampling: speculative samples are distributed exactly as vanilla samples

def exact_vanilla_distribution(model, prompt, n_tokens, **sampling):
    """P(first n_tokens emitted tokens) by enumerating the tree of continuations."""
    V = model.config.vocab_size
    dist = {(): 1.0}
    with torch.no_grad():
        for _ in range(n_tokens):
            grown = {}
            for prefix, prob in dist.items():
                logits, _ = model(torch.tensor([prompt + list(prefix)]), n_heads=1)
                p = probs_from_logits(logits[0, -1, 0], **sampling)
                for v in range(V):
                    grown[prefix + (v,)] = prob * float(p[v])
            dist = grown
    return dist


def total_variation(samples, exact):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    keys = set(exact) | set(counts)
    return 0.5 * sum(abs(counts.get(k, 0) / len(samples) - exact.get(k, 0.0)) for k in keys)


# 27 outcomes (3 tokens of a 3-token vocabulary), 1000 runs. For this model sampling noise alone
# gives a TV of 0.02-0.04; accepting every draft gives ~0.6, resampling a rejected draft from p
# instead of norm(max(0, p - q)) ~0.23 (test_wrong_acceptance_rules_fail_the_distribution_test).
N_RUNS, TV_BOUND = 1000, 0.1


def tiny_vocab_model(head_type='block', arch='gpt2'):
    seed, std = (6, 0.7) if head_type == 'sequential' else (12, 0.5)  # (the controls fail hard)
    return random_mtp(vocab=3, n_future=3, std=std, seed=seed, head_type=head_type,
                      arch=arch), [0, 2, 1]


def accept_every_draft(p, drafts, q, greedy, generator=None):
    bonus = torch.multinomial(p[len(drafts)], 1, generator=generator)
    return drafts.tolist() + bonus.tolist()


def resample_rejected_from_p(p, drafts, q, greedy, generator=None):
    k = drafts.numel()
    u = torch.rand(k, generator=generator)
    accept = u * q[torch.arange(k), drafts] < p[torch.arange(k), drafts]
    n = int(accept.long().cumprod(0).sum())
    return drafts[:n].tolist() + torch.multinomial(p[n], 1, generator=generator).tolist()


# -----------------------------------------------------------------------------
# corpora and training runs

LETTERS = 'abcdefghijklmnopqrstuvwxyzABCDEF'
WORDS = [LETTERS[i * 8:(i + 1) * 8] for i in range(4)]  # 4 words, 32 distinct characters


def pattern_text(n_words=2500, seed=0):
    """A synthetic corpus: random choice among a few fixed 8-letter words, so inside a word
    x_{t+1} and x_{t+2} are determined by x_t."""
    rng = random.Random(seed)
    return ''.join(rng.choice(WORDS) for _ in range(n_words))


def make_corpus(out_dir, text, tokenizer='char'):
    """train.bin / val.bin / meta.json of `text`, written by data.prepare.prepare."""
    prepare(text, str(out_dir), tokenizer)
    return str(out_dir)


TINY_FLAGS = ['--quiet=true', '--device=cpu', '--dtype=float32', '--compile=false',
              '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=8',
              '--n_future=2', '--eval_iters=2', '--warmup_iters=2', '--learning_rate=1e-2',
              '--min_lr=1e-3', '--log_interval=1000', '--head_type=block']


def train_config(data_dir, out_dir, *flags):
    """train.py's config for a tiny, quiet CPU run (later flags override earlier ones)."""
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


@pytest.fixture(scope='session')
def neox_ntp_ckpt(corpus, tmp_path_factory):
    """ntp_ckpt's GPT-NeoX twin: a random tiny GPT-NeoX of TINY_FLAGS' shape, saved as a
    checkpoint and briefly trained as a next-token model by train.py (init_from)."""
    out = tmp_path_factory.mktemp('neox')
    config = tiny_config('neox', n_layer=2, n_head=2, vocab_size=32, block_size=16)
    model = MTPGPT(MTPConfig(**config.__dict__, n_future=1))
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                         meta=load_meta(corpus), config={}), str(out / 'init.pt'))
    run_train(corpus, out, f'--init_from={out / "init.pt"}', '--n_future=1', '--max_iters=10',
              '--eval_interval=10')
    return os.path.join(str(out), 'ckpt.pt')


@pytest.fixture
def source_ckpt(arch, request):
    """A trained next-token checkpoint to adapt, of each backbone: ntp_ckpt or neox_ntp_ckpt."""
    return request.getfixturevalue('ntp_ckpt' if arch == 'gpt2' else 'neox_ntp_ckpt')


@pytest.fixture(scope='session')
def counting_ckpt(tmp_path_factory):
    """A directory with counting_mtp(n_future=3) saved as ckpt.pt in train.py's format, with a
    char tokenizer (a..m), and the val.bin its config points to (0, 1, .., 12, 0, 1, ..).
    Beside it, the same model as other.pt with another tokenizer of the same size (n..z), and
    as distilled.pt with meta's source_data (distill.py's: the same tokenizer)."""
    out = tmp_path_factory.mktemp('ckpt')
    chars = 'abcdefghijklm'
    model = counting_mtp(n_future=3)
    meta = {'kind': 'char', 'chars': chars, 'vocab_size': len(chars)}
    for name, meta_of in (('ckpt', meta), ('other', dict(meta, chars='nopqrstuvwxyz')),
                          ('distilled', dict(meta, source_data=str(out)))):
        save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                             meta=meta_of, config={'dataset': 'tiny', 'data_dir': str(out)}),
                        str(out / f'{name}.pt'))
    np.arange(200, dtype=np.uint16).__mod__(13).astype(np.uint16).tofile(out / 'val.bin')
    return out


def local_tokenizer(path, text):
    """A small byte-level BPE trained on text, saved as a Hugging Face tokenizer directory
    (what AutoTokenizer reads; Pythia's is one, fetched by name). Needs transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, special_tokens=['<|endoftext|>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>').save_pretrained(
        str(path))
    return str(path)



# -----------------------------------------------------------------------------
# command lines

def run_cli(script, *args, env_extra=None):
    """`python <script> args...` (script relative to the repository) in a fresh process, from
    the repository root, single-threaded; the CompletedProcess with text stdout / stderr."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def one_line_error(source, *args, match=()):
    """Assert that an error reaches the user as exactly one line, and return that line.

    source is either a finished script (run_cli's CompletedProcess): it failed (exit code != 0)
    and its stderr is one line `error: ...`, without a traceback; or a callable: source(*args)
    raises UserError whose message is one non-empty line without surrounding blanks.
    match: a fragment, or several, that the line must contain (plain text, not a pattern)."""
    if isinstance(source, subprocess.CompletedProcess):
        assert source.returncode != 0, source.stdout[-2000:]
        lines = source.stderr.strip().splitlines()
        assert len(lines) == 1, source.stderr
        assert lines[0].startswith('error:') and 'Traceback' not in source.stderr, source.stderr
        line = lines[0]
    else:
        with pytest.raises(UserError) as e:
            source(*args)
        line = str(e.value)
        assert line and '\n' not in line and line.strip() == line, line
    for fragment in [match] if isinstance(match, str) else match:
        assert fragment in line, (fragment, line)
    return line


def fails_on_a_full_disk(action, expected, limit=4000):
    """Whether action() fails with an error that expected(error) accepts when no file may grow
    past limit bytes: a full disk, in a forked child (RLIMIT_FSIZE; writes fail with EFBIG)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            action()
        except BaseException as e:
            code = 0 if expected(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
