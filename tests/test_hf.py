"""Conversion from and to Hugging Face transformers (optional; these tests need it, and CI
installs it): a random GPT-NeoX (Pythia in miniature) converted by convert.from_hf gives the same
logits and the same greedy text as transformers itself; convert.to_hf exports a nanoMTP model's
next-token path as GPT2LMHeadModel or GPTNeoXForCausalLM; Pythia names, Hugging Face tokenizers,
and the one-line errors offline or without transformers. No network: every model is random and
built here. (The GPT-2 conversion test is in test_scale.py.)"""
import sys
from dataclasses import asdict

import pytest
import torch

import convert as C
import model as M
from common import UserError, load_checkpoint, save_checkpoint
from data.text import tokenizer_for
from heads import MTPGPT, MTPConfig
from sample import generate, generate_self_speculative
from conftest import (local_tokenizer, one_line_error, run_cli, run_train, tiny_config,
                      tiny_mtp)

transformers = pytest.importorskip('transformers', reason='optional dependency not installed')

V = 50
PROMPTS = [[3], [7, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]
N_NEW = 32


def random_pythia(seed=0, vocab=V, **kw):
    """A GPTNeoXForCausalLM of Pythia's shape in miniature (rotary on 25% of each head's 16
    dims, base 10000, parallel residual, untied embeddings, exact GELU) with EVERY parameter
    random: matrices N(0, 0.2), biases N(0, 0.1), LayerNorm gains 1 + N(0, 0.2)."""
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=96, rotary_pct=0.25, rotary_emb_base=10000,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_act='gelu',
        bos_token_id=0, eos_token_id=None, pad_token_id=None, **kw)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if 'layernorm' in name or 'layer_norm' in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith('weight')
                        else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() >= 2 else 0.1)
    return hf


def hf_greedy(hf, prompt, n):
    """transformers' own greedy decoding: the n tokens after the prompt."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# from_hf: GPT-NeoX (Pythia) is read exactly

def test_pythia_conversion_gives_the_same_logits():
    """convert.from_hf(random GPTNeoXForCausalLM): the options are Pythia's (rotary 0.25, parallel
    residual, untied, biases, exact GELU, no position table) and the logits agree within 1e-4;
    so do those of an MTPGPT adapted from it (head 1 at any attach_layer)."""
    hf = random_pythia()
    ours = C.from_hf(hf).eval()
    c = ours.config
    assert (c.rotary_pct, c.rotary_base, c.parallel_residual, c.tie_embeddings, c.gelu, c.bias) \
        == (0.25, 10000.0, True, False, 'none', True)
    assert 'wpe' not in ours.transformer
    x = torch.randint(V, (3, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        assert max_diff(ours(x)[0], want) <= 1e-4
        assert want.std() > 1.0  # the random weights matter: far from uniform logits
        for attach in (0, 1):
            mtp = MTPGPT.from_gpt(ours, n_future=3, attach_layer=attach, head_type='block').eval()
            assert max_diff(mtp(x)[0][:, :, 0], want) <= 1e-4


def test_pythia_greedy_decoding_equals_transformers_generate():
    """Greedy sample.generate of the converted model (KV cache, rotary positions from the cache
    offset) emits exactly transformers' generate for 32 tokens on several prompts, and so does
    self-speculative decoding through an adapted MTPGPT (drafts, rollbacks)."""
    hf = random_pythia()
    ours = MTPGPT.from_gpt(C.from_hf(hf)).eval()  # (decoding takes an MTPGPT)
    mtp = MTPGPT.from_gpt(ours, n_future=3, attach_layer=1, head_type='block').eval()
    with torch.no_grad():  # heads 2, 3: not copies of head 1 (drafts get rejected too)
        for head in list(mtp.heads)[1:]:
            for p in head.parameters():
                p.add_(0.1 * torch.randn_like(p))
    for prompt in PROMPTS:
        want = hf_greedy(hf, prompt, N_NEW)
        assert generate(ours, prompt, N_NEW, temperature=0).tokens == want
        assert generate_self_speculative(mtp, prompt, N_NEW, temperature=0).tokens == want
    assert len(set(tuple(hf_greedy(hf, p, 8)) for p in PROMPTS)) == len(PROMPTS)


def test_from_hf_refuses_a_gpt_neox_of_another_shape_in_one_line():
    """A GPT-NeoX whose MLP is not 4x wide cannot be represented: a one-line UserError."""
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=100))
    one_line_error(C.from_hf, hf, match="intermediate_size")


# -----------------------------------------------------------------------------
# to_hf: a nanoMTP model's next-token path as a transformers model

# the exported models: GPT-2 and GPT-NeoX backbones, with and without biases, plain and as an
# MTPGPT whose next-token path runs through head 1's blocks; rotary options off Pythia's too
EXPORTED = {
    'gpt2': dict(n_future=1),
    'gpt2-bias-untied-mtp': dict(n_future=3, attach_layer=1, bias=True, tie_embeddings=False),
    'neox': dict(n_future=1, arch='neox'),
    'neox-nobias-tied-mtp': dict(n_future=2, arch='neox', attach_layer=2, bias=False,
                                 tie_embeddings=True, rotary_pct=0.5, rotary_base=500.0),
}


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) if name.endswith(
    '-mtp') else name for name in EXPORTED])
def test_to_hf_gives_the_same_logits_and_the_same_greedy_text(name):
    """convert.to_hf(model) is GPT2LMHeadModel (GPT-2 options) or GPTNeoXForCausalLM (rotary): its
    logits equal our next-token logits (1e-4), transformers' greedy generate equals our
    sample.generate for 32 tokens on several prompts, and from_hf of the export reads back the
    same function."""
    model = tiny_mtp(block_size=64, vocab_size=V, **EXPORTED[name])
    with torch.no_grad():  # large weights: peaked, distinct predictions
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf = C.to_hf(model)
    want_class = 'GPTNeoXForCausalLM' if name.startswith('neox') else 'GPT2LMHeadModel'
    assert type(hf).__name__ == want_class
    x = torch.randint(V, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x, n_heads=1)[0][:, :, 0]
        assert max_diff(hf(x).logits, ours) <= 1e-4
        assert max_diff(C.from_hf(hf)(x)[0], ours) <= 1e-4
    for prompt in PROMPTS:
        assert hf_greedy(hf, prompt, N_NEW) == generate(model, prompt, N_NEW, temperature=0).tokens


def test_to_hf_refuses_what_gpt2_cannot_express_in_one_line():
    """A parallel residual without rotary positions is neither GPT-2 nor GPT-NeoX."""
    model = M.GPT(tiny_config(parallel_residual=True))
    one_line_error(C.to_hf, model, match='parallel residual')


def test_without_transformers_conversion_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers fails
    model = M.GPT(tiny_config())
    one_line_error(C.to_hf, model, match='pip install transformers')
    one_line_error(C.from_pretrained, 'EleutherAI/pythia-70m', match='pip install transformers')


# -----------------------------------------------------------------------------
# Pythia by name, offline

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, in this process."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hub, 'HF_HUB_CACHE', str(tmp_path / 'hf'))


def test_load_model_of_a_pythia_name_offline_is_a_one_line_error(offline):
    """load_model('EleutherAI/pythia-70m') (what --ckpt and --init_from call) goes through
    convert.from_pretrained: offline, one line naming the model and the cause."""
    from common import load_model
    one_line_error(load_model, 'EleutherAI/pythia-70m', match=('EleutherAI/pythia-70m', 'OSError'))


@pytest.mark.slow
@pytest.mark.parametrize('script,flag', [('sample.py', '--ckpt'), ('train.py', '--init_from'),
                                         ('study.py', '--init_from')])
def test_pythia_names_offline_are_one_line_errors_on_the_command_line(tmp_path, corpus, script,
                                                                      flag):
    """The same from sample.py --ckpt=..., train.py and study.py --preset=paper --init_from=...:
    exit 1, one line."""
    (tmp_path / 'text.txt').write_text('some text to read. ' * 200)
    extra = {'sample.py': ['--prompt=a'],
             'train.py': [f'--data_dir={corpus}', f'--out_dir={tmp_path}/out', '--device=cpu'],
             'study.py': ['--preset=paper', f'--corpora={tmp_path}/text.txt',
                          f'--out_dir={tmp_path}/study']}[script]
    r = run_cli(script, f'{flag}=EleutherAI/pythia-70m', *extra,
                env_extra={'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')})
    one_line_error(r, match='EleutherAI/pythia-70m')


# -----------------------------------------------------------------------------
# Hugging Face tokenizers: data/prepare.py --tokenizer=<name or directory>

def test_prepare_with_a_hugging_face_tokenizer_and_adapt_a_padded_gpt_neox(tmp_path):
    """prepare.py --tokenizer=<HF tokenizer> writes the tokenizer's ids (round trip exact) and
    meta {'kind': 'hf'}; a GPT-NeoX checkpoint whose embedding is padded past that vocabulary
    (as Pythia's 50304 rows for ~50280 tokens) adapts to MTP on it, and decodes text with it."""
    from data.text import Tokenizer, load_meta
    text = 'the cat sat on the mat. a dog sat on a log. ' * 200
    tok_dir = local_tokenizer(tmp_path / 'tok', text)
    import data.prepare as P
    P.main(['--dataset=x', f'--input={_write(tmp_path, text)}', f'--out_dir={tmp_path}/data',
            f'--tokenizer={tok_dir}'])
    meta = load_meta(str(tmp_path / 'data'))
    assert meta['kind'] == 'hf' and meta['name'] == tok_dir and meta['vocab_size'] < 300
    tok = Tokenizer(meta)
    import numpy as np
    ids = np.fromfile(tmp_path / 'data' / 'train.bin', dtype=np.uint16).tolist()
    ids += np.fromfile(tmp_path / 'data' / 'val.bin', dtype=np.uint16).tolist()
    assert tok.decode(ids) == text  # (train and val are encoded apart: ids may split there)
    # a GPT-NeoX with a padded embedding (320 rows) adapts on it
    config = tiny_config('neox', n_layer=2, n_head=2, vocab_size=320, block_size=16)
    src = MTPGPT(MTPConfig(**config.__dict__, n_future=1))
    save_checkpoint(dict(model=src.state_dict(), model_args=asdict(src.config), meta=meta,
                         config={}), str(tmp_path / 'src.pt'))
    s = run_train(str(tmp_path / 'data'), tmp_path / 'out', f'--init_from={tmp_path}/src.pt',
                  '--max_iters=2', '--eval_interval=2')
    assert s['model'].config.vocab_size == 320 and s['model'].config.rotary_pct == 0.25
    assert tokenizer_for(load_checkpoint(s['ckpt'])).decode(tok.encode('the cat')) == 'the cat'


def _write(tmp_path, text):
    path = tmp_path / 'in.txt'
    path.write_text(text, encoding='utf-8')
    return str(path)


def test_prepare_with_an_unreachable_tokenizer_is_a_one_line_error(tmp_path, offline):
    """prepare.py --tokenizer=<HF name> offline: one line (a UserError, which its cli prints)
    naming the tokenizer, before anything is written."""
    import data.prepare as P
    with pytest.raises(UserError) as e:
        P.main(['--dataset=x', f'--input={_write(tmp_path, "abc")}', f'--out_dir={tmp_path}/out',
                '--tokenizer=EleutherAI/pythia-70m'])
    line = str(e.value)
    assert '\n' not in line and 'EleutherAI/pythia-70m' in line, line
    assert not (tmp_path / 'out').exists()
