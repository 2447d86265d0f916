"""Specification of data/prepare.py: lossless token files, the tokenizer metadata, the
offline CLI and its one-line errors."""
import json
import os

import numpy as np
import pytest

from data.prepare import Tokenizer, prepare, load_meta
from conftest import SHARED, one_line_error, run_cli

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Résumé — naïve café, 3.14 µs; tabs\tand  double  spaces!\n") * 20


def read_ids(path):
    return np.fromfile(path, dtype=np.uint16).tolist()


def test_char_prepare_roundtrips_exactly(tmp_path):
    """char: train.bin + val.bin decode (with the tokenizer in meta.json) back to the text;
    train is the first 90%; meta.json records vocab_size = number of distinct characters."""
    info = prepare(TEXT, str(tmp_path), 'char')
    meta = load_meta(str(tmp_path))
    assert meta['kind'] == 'char'
    assert meta['vocab_size'] == len(set(TEXT)) == info['vocab_size']
    tok = Tokenizer(meta)
    train = read_ids(tmp_path / 'train.bin')
    val = read_ids(tmp_path / 'val.bin')
    assert len(train) == info['train_tokens'] and len(val) == info['val_tokens']
    assert tok.decode(train) + tok.decode(val) == TEXT
    assert tok.decode(train) == TEXT[:int(len(TEXT) * 0.9)]
    assert max(train + val) < meta['vocab_size']


def test_bpe_prepare_roundtrips_exactly(tmp_path):
    """bpe (GPT-2 r50k_base via a local tiktoken cache): decode(train) + decode(val) is the
    original text exactly, also across the train/val split boundary."""
    assert os.path.isdir(os.environ.get('TIKTOKEN_CACHE_DIR', '')), \
        f"the tiktoken cache {SHARED}/tiktoken is needed offline"
    info = prepare(TEXT, str(tmp_path), 'bpe')
    meta = load_meta(str(tmp_path))
    assert meta['kind'] == 'bpe' and meta['encoding'] == 'r50k_base'
    assert meta['vocab_size'] == 50257 == info['vocab_size']
    tok = Tokenizer(meta)
    train = read_ids(tmp_path / 'train.bin')
    val = read_ids(tmp_path / 'val.bin')
    assert tok.decode(train) + tok.decode(val) == TEXT
    assert len(train) < len(TEXT[:int(len(TEXT) * 0.9)])  # really BPE, not characters
    assert max(train + val) < 50257


def test_bpe_tokenizer_matches_tiktoken():
    """The bpe tokenizer is tiktoken's r50k_base (identical ids)."""
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    tok = Tokenizer({'kind': 'bpe', 'encoding': 'r50k_base'})
    assert tok.encode(TEXT) == enc.encode_ordinary(TEXT)
    assert tok.eot == enc.eot_token == 50256


def test_char_vocab_over_uint16_is_refused(tmp_path):
    """A char corpus with more than 65536 distinct characters cannot be stored as uint16:
    prepare raises a ValueError saying so, and writes nothing."""
    text = ''.join(chr(0x10000 + i) for i in range(66000))
    with pytest.raises(ValueError, match='uint16'):
        prepare(text, str(tmp_path / 'big'), 'char')
    assert not os.path.exists(tmp_path / 'big' / 'train.bin')


def test_char_vocab_of_exactly_65536_fits(tmp_path):
    """The uint16 limit is not off by one: 65536 distinct characters (ids 0..65535) work and
    round-trip."""
    text = ''.join(chr(0x10000 + i) for i in range(65536))
    prepare(text, str(tmp_path), 'char', val_fraction=0.5)
    tok = Tokenizer(load_meta(str(tmp_path)))
    ids = read_ids(tmp_path / 'train.bin') + read_ids(tmp_path / 'val.bin')
    assert max(ids) == 65535
    assert tok.decode(ids) == text


def test_char_tokenizer_rejects_unknown_characters():
    """Encoding a character outside the vocabulary is a ValueError naming it."""
    tok = Tokenizer.from_text('char', 'abc')
    with pytest.raises(ValueError, match='z'):
        tok.encode('abz')


# -----------------------------------------------------------------------------
# the CLI

def test_cli_prepares_a_local_file_offline(tmp_path):
    """`prepare.py --dataset=x --input=FILE --out_dir=DIR` needs no network, writes the files
    and ends with a JSON summary line."""
    src = tmp_path / 'in.txt'
    src.write_text(TEXT, encoding='utf-8')
    out = tmp_path / 'out'
    r = run_cli('data/prepare.py', '--dataset=x', f'--input={src}', f'--out_dir={out}',
                env_extra={'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9'})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary['vocab_size'] == len(set(TEXT))
    assert summary['train_tokens'] + summary['val_tokens'] == len(TEXT)
    tok = Tokenizer(load_meta(str(out)))
    assert tok.decode(read_ids(out / 'train.bin') + read_ids(out / 'val.bin')) == TEXT


# (data/prepare.py's arguments, fragments of the one line it prints); {tmp}: the test's directory
PREPARE_ERRORS = [
    # an unknown --flag names the valid flags
    (['--bogus=1', '--out_dir={tmp}'], ('bogus', 'input')),
    # a missing --input file is named
    (['--dataset=x', '--input={tmp}/nope.txt', '--out_dir={tmp}/out'], 'nope.txt'),
]


@pytest.mark.parametrize('args,fragments', PREPARE_ERRORS,
                         ids=[' '.join(a) for a, _ in PREPARE_ERRORS])
def test_cli_errors_are_one_line(tmp_path, args, fragments):
    """Bad input exits nonzero with a single 'error:' line, no traceback."""
    one_line_error(run_cli('data/prepare.py', *[a.format(tmp=tmp_path) for a in args]),
                   match=fragments)


def test_the_main_job_needs_no_network(tmp_path, monkeypatch):
    """Tiny Shakespeare ships in data/: preparing it opens no connection (every socket fails
    here), and gives the text of data/tinyshakespeare.txt."""
    import socket
    import data.prepare as P

    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(socket, 'create_connection', offline)
    monkeypatch.setattr(socket.socket, 'connect', offline)
    text = P.read_corpus('', 'shakespeare_char')
    assert len(text) == 1115394 and text.startswith('First Citizen:')
    summary = P.prepare(text, str(tmp_path / 'sc'), 'char')
    assert summary['vocab_size'] == 65


def test_a_dataset_without_text_names_input_in_one_line():
    import data.prepare as P
    with pytest.raises(FileNotFoundError, match='pass --input=FILE'):
        P.read_corpus('', 'no_such_dataset')
