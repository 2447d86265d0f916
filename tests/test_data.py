"""Specification of data/prepare.py: lossless token files, the tokenizer metadata, the
offline CLI and its one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data.prepare as P
from data.prepare import prepare
from common import load_checkpoint
from data.text import Tokenizer, load_meta
from conftest import SHARED, fails_on_a_full_disk, one_line_error, run_cli

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


# (data/prepare.py's arguments, fragments of the one line it prints); {tmp}: the test's
# directory, with empty.txt, latin1.txt (not UTF-8), tiny.txt ('a') and a plain file blocker
PREPARE_ERRORS = [
    # an unknown --flag names the valid flags
    (['--bogus=1', '--out_dir={tmp}'], ('bogus', 'input')),
    # a missing --input file is named
    (['--dataset=x', '--input={tmp}/nope.txt', '--out_dir={tmp}/out'], 'nope.txt'),
    (['--dataset=x', '--input={tmp}/empty.txt', '--out_dir={tmp}/out'], ('empty.txt', 'is empty')),
    (['--dataset=x', '--input={tmp}/latin1.txt', '--out_dir={tmp}/out'],
     ('latin1.txt', 'not UTF-8')),
    (['--val_fraction=0', '--out_dir={tmp}/out'], 'val_fraction must be in (0, 1), got 0.0'),
    (['--val_fraction=1', '--out_dir={tmp}/out'], 'val_fraction must be in (0, 1), got 1.0'),
    (['--val_fraction=-0.5', '--out_dir={tmp}/out'], 'val_fraction must be in (0, 1)'),
    (['--dataset=x', '--input={tmp}/tiny.txt', '--out_dir={tmp}/out'], 'train split'),
    # a directory that cannot be made: the OS's reason, not a tokenizer-cache hint
    (['--out_dir={tmp}/blocker/out'], ('blocker', 'Not a directory')),
]


@pytest.mark.parametrize('args,fragments', PREPARE_ERRORS,
                         ids=[' '.join(a) for a, _ in PREPARE_ERRORS])
def test_bad_input_is_a_one_line_user_error_and_writes_nothing(tmp_path, args, fragments):
    """Bad flags and files, and file system errors, are one line that names the problem."""
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1') * 10)
    (tmp_path / 'tiny.txt').write_text('a')
    (tmp_path / 'blocker').write_text('a plain file')
    line = one_line_error(P.main, [a.format(tmp=tmp_path) for a in args], match=fragments)
    assert 'TIKTOKEN' not in line  # (only a BPE tokenizer's failure to load is a cache problem)
    assert not (tmp_path / 'out').exists()


def test_cli_prints_an_error_as_one_line(tmp_path):
    """The real command line: exit code 1 and a single 'error:' line, no traceback."""
    (tmp_path / 'empty.txt').write_text('')
    one_line_error(run_cli('data/prepare.py', '--dataset=x', f'--input={tmp_path}/empty.txt',
                           f'--out_dir={tmp_path}/out'), match='is empty')


# -----------------------------------------------------------------------------
# the dataset is switched in as a whole

def dataset(out):
    """{file name: bytes} of a prepared dataset, and the other files of the directory."""
    files = {name: (out / name).read_bytes() for name in P.DATASET_FILES if (out / name).exists()}
    return files, sorted(set(os.listdir(out)) - set(P.DATASET_FILES))


def deadly(function, point, calls):
    """`function`, but the process dies (os._exit: no clean-up runs) at the point-th call of any
    function wrapped so."""
    def call(*args, **kwargs):
        calls.append(function)
        if len(calls) == point:
            os._exit(9)
        return function(*args, **kwargs)
    return call


@pytest.mark.parametrize('dataset', ['', '.', '..', 'a/b'])
def test_a_dataset_name_that_is_not_a_folder_in_data_is_refused(dataset, tmp_path):
    """--dataset= (or ., .., a path) never writes into data/ itself or beside it."""
    (tmp_path / 'a.txt').write_text('some text. ' * 100)
    one_line_error(P.main, [f'--dataset={dataset}', f'--input={tmp_path / "a.txt"}'],
                   match='must name a folder in data/')


@pytest.mark.parametrize('meta', [
    {'kind': 'bpe', 'encoding': 'r50k_base', 'vocab_size': 58},     # GPT-2's BPE has 50257
    {'kind': 'bpe', 'chars': 'abc', 'vocab_size': 50257},            # no encoding
    {'kind': 'bpe', 'encoding': 'cl999k', 'vocab_size': 50257}])     # not one prepare writes
def test_a_meta_whose_bpe_kind_lies_is_refused_when_read(meta, tmp_path):
    (tmp_path / 'meta.json').write_text(json.dumps(meta))
    one_line_error(load_meta, str(tmp_path), match="is not a dataset's meta.json")


@pytest.mark.skipif(not os.path.exists('/proc/self/stat'), reason='start times: Linux /proc')
def test_a_switch_whose_writers_id_was_reused_is_still_finished(tmp_path):
    """A prepare killed after its commit mark, its process id since taken by a live process:
    recover() still renames the whole new dataset in (the mark's start time is not the live
    process's), so a reader never sees half of each."""
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        for name in P.DATASET_FILES:
            (tmp_path / name).write_text('old')
            (tmp_path / f'{name}.tmp.{live.pid}').write_text('new')
        (tmp_path / f'switch.{live.pid}').write_text('1')  # the dead prepare's start time
        P.recover(str(tmp_path))
    finally:
        live.kill()
        live.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(P.DATASET_FILES)
    assert all((tmp_path / name).read_text() == 'new' for name in P.DATASET_FILES)


def test_a_killed_prepare_leaves_the_whole_old_or_the_whole_new_dataset(tmp_path):
    """prepare.py killed before each of its file operations in turn (open, rename, remove;
    in a forked child): after recover() (which prepare and train.py's data loading run first)
    the dataset is the whole old one or the whole new one, with no files left over."""
    out = tmp_path / 'data'
    prepare(TEXT.upper() * 2, str(tmp_path / 'new'))
    new, _ = dataset(tmp_path / 'new')
    outcomes = []
    for point in range(1, 30):
        prepare(TEXT, str(out))
        old, _ = dataset(out)
        pid = os.fork()
        if pid == 0:  # the child: prepare the new text, dying at `point`
            try:
                calls = []
                P.open = deadly(open, point, calls)
                os.replace, os.remove = deadly(os.replace, point, calls), deadly(os.remove, point,
                                                                                  calls)
                prepare(TEXT.upper() * 2, str(out))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        P.recover(str(out))
        files, others = dataset(out)
        assert files in (old, new) and others == [], (point, others)
        outcomes.append('new' if files == new else 'old')
        if os.WEXITSTATUS(status) == 0:  # it ran to the end: every point has been tried
            break
    assert outcomes[0] == 'old' and outcomes[-1] == 'new' and len(outcomes) >= 8, outcomes


def test_a_full_disk_leaves_the_old_dataset_and_no_temp_files(tmp_path):
    """A disk that fills up while the new dataset is written (a forked child whose files may
    not grow past 4 kB, RLIMIT_FSIZE): prepare fails with an OSError, the old dataset is whole
    and no temporary file is left."""
    prepare(TEXT, str(tmp_path))
    old = dataset(tmp_path)
    assert fails_on_a_full_disk(lambda: prepare(TEXT.upper() * 2, str(tmp_path)),
                                lambda error: isinstance(error, OSError))
    assert dataset(tmp_path) == old


def test_a_reader_keeps_the_old_files_it_has_mapped(tmp_path):
    """A training run memory-maps train.bin; preparing a smaller dataset over it replaces the
    file, not its contents: the run keeps reading the old tokens (a truncated file would kill
    it with SIGBUS, here only the forked child that reads)."""
    prepare(TEXT * 4, str(tmp_path))
    mapped = np.memmap(tmp_path / 'train.bin', dtype=np.uint16, mode='r')
    before = np.array(mapped)
    prepare(TEXT[:300], str(tmp_path))
    pid = os.fork()
    if pid == 0:
        os._exit(0 if np.array_equal(np.array(mapped), before) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


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


# -----------------------------------------------------------------------------
# one data check for every script that reads data beside a checkpoint

def other_dataset(folder, chars='nopqrstuvwxyz', ids_up_to=13):
    """A dataset directory of 13 characters (not the counting checkpoint's a..m)."""
    folder.mkdir()
    for split in ('train', 'val'):
        (np.arange(300) % ids_up_to).astype(np.uint16).tofile(folder / f'{split}.bin')
    (folder / 'meta.json').write_text(json.dumps(dict(kind='char', chars=chars,
                                                      vocab_size=len(chars))))
    return folder


def test_every_reader_refuses_data_of_another_tokenizer(counting_ckpt, tmp_path):
    """marginalize.py, bench.py decode, probes.py, --draft_vocab and the prompts of distill.py all
    read data through data.text.tokens_for: another tokenizer's data, or ids beyond the model's
    vocabulary, is a one-line error naming the file, never a result on mis-tokenized data."""
    import bench
    import marginalize
    import probes
    from data.text import frequent_tokens, val_prompts
    ckpt_path, other = str(counting_ckpt / 'ckpt.pt'), other_dataset(tmp_path / 'other')
    for run, args in ((marginalize.main, [f'--ckpt={ckpt_path}', f'--data_dir={other}']),
                      (bench.main, ['decode', f'--ckpt={ckpt_path}', f"--data={other}/val.bin"]),
                      (probes.main, [f'--ckpt={ckpt_path}', f'--data_dir={other}'])):
        one_line_error(run, args, match=('val.bin' if run is not probes.main else 'train.bin',
                                         'another tokenizer', "chars 'abcdefghijklm'"))
    ckpt = dict(load_checkpoint(ckpt_path), config=dict(data_dir=str(other)))
    one_line_error(frequent_tokens, ckpt, 5, match=('train.bin', 'another tokenizer'))
    one_line_error(val_prompts, ckpt, '', 4, 8, match='another tokenizer')  # (distill's prompts)
    wide = other_dataset(tmp_path / 'wide', chars='abcdefghijklm', ids_up_to=40)
    one_line_error(val_prompts, ckpt, f'{wide}/val.bin', 4, 8, match=('up to 39', 'vocab_size 13'))


@pytest.mark.parametrize('meta,fragment', [
    ('{"kind": "char", "chars": "ab"', 'cannot read'),                      # not JSON
    ('{"kind": "char", "chars": "ab"}', 'vocab_size'),                      # missing
    ('{"kind": "char", "chars": "ab", "vocab_size": "2"}', 'vocab_size'),   # a string
    ('{"kind": "char", "chars": "ab", "vocab_size": [2]}', 'vocab_size'),   # a list
    ('{"kind": "wordpiece", "vocab_size": 2}', 'tokenizer kind'),           # an unknown kind
    ('{"kind": "char", "chars": "ab", "vocab_size": 40}', 'vocab_size'),    # fewer characters
    ('[1, 2]', 'meta.json'),
])
def test_a_bad_meta_json_is_a_one_line_error_when_read(tmp_path, meta, fragment):
    (tmp_path / 'meta.json').write_text(meta)
    one_line_error(load_meta, str(tmp_path), match=(str(tmp_path / 'meta.json'), fragment))


def test_training_on_ids_beyond_the_datasets_vocabulary_is_refused(corpus, tmp_path):
    """A train.bin whose ids its meta.json cannot have (another dataset's files) is a one-line
    error before training, not an index error deep in the embedding."""
    import train as T
    from conftest import train_config
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'meta.json').write_text(json.dumps(dict(kind='char', chars='ab', vocab_size=2)))
    for split in ('train', 'val'):
        (np.arange(400) % 5).astype(np.uint16).tofile(data / f'{split}.bin')
    one_line_error(T.train, train_config(str(data), str(tmp_path / 'out')),
                   match=('train.bin', 'up to 4', 'vocab_size 2'))


def test_a_second_prepare_of_a_dataset_is_refused_naming_the_first(tmp_path):
    """prepare.py owns the dataset directory while it writes it: another live writer's mark is a
    one-line error (two prepares could otherwise leave train.bin of one, val.bin of the other)."""
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / 'ds').mkdir()
        (tmp_path / 'ds' / f'writer.{holder.pid}').touch()
        (tmp_path / 'in.txt').write_text(TEXT)
        one_line_error(P.main, [f"--input={tmp_path / 'in.txt'}", f"--out_dir={tmp_path / 'ds'}",
                                '--dataset=x'], match=(f'process {holder.pid}', 'dataset'))
        assert sorted(p.name for p in (tmp_path / 'ds').iterdir()) == [f'writer.{holder.pid}']
    finally:
        holder.kill()
        holder.wait()
