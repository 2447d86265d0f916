"""
Turn a text corpus into train.bin / val.bin (uint16 token ids) and meta.json (the tokenizer).

    python data/prepare.py                                  # shakespeare_char
    python data/prepare.py --dataset=shakespeare            # GPT-2 BPE (tiktoken r50k_base)
    python data/prepare.py --dataset=mytext --input=my.txt --tokenizer=char
    python data/prepare.py --dataset=pile --input=my.txt --tokenizer=EleutherAI/pythia-70m  # (*)

(*) any Hugging Face tokenizer, by name or local directory, through transformers' AutoTokenizer
(optional; needs the network or a local copy): the token ids that model reads, e.g. Pythia's.

Tiny Shakespeare ships with the project (data/tinyshakespeare.txt, nanoGPT's char-rnn file), so
nothing needs a network but tiktoken's BPE file (set TIKTOKEN_CACHE_DIR to a cache when offline).
"""
import glob
import json
import os
import sys
from contextlib import suppress
from dataclasses import dataclass

import numpy as np

SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tinyshakespeare.txt')
# known datasets: name -> (their text, shipped in data/, tokenizer)
DATASETS = {'shakespeare_char': (SHAKESPEARE, 'char'), 'shakespeare': (SHAKESPEARE, 'bpe')}
BPE_ENCODING = 'r50k_base'  # GPT-2's BPE (identical to tiktoken's "gpt2")


class Tokenizer:
    """encode(str) -> list[int] and decode(list[int]) -> str, described by a small meta dict:
    {'kind': 'char', 'chars': '...'}, {'kind': 'bpe', 'encoding': 'r50k_base'} or
    {'kind': 'hf', 'name': 'EleutherAI/pythia-70m'} (a Hugging Face tokenizer)."""

    def __init__(self, meta):
        self.meta = meta
        if meta['kind'] == 'char':
            self.itos, self.eot = meta['chars'], None
            self.stoi = {ch: i for i, ch in enumerate(self.itos)}
            self.vocab_size = len(self.itos)
        elif meta['kind'] == 'bpe':
            import tiktoken
            self.enc = tiktoken.get_encoding(meta['encoding'])
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif meta['kind'] == 'hf':
            from transformers import AutoTokenizer
            self.enc = AutoTokenizer.from_pretrained(meta['name'])
            self.vocab_size, self.eot = len(self.enc), self.enc.eos_token_id
        else:
            raise ValueError(f"unknown tokenizer kind {meta['kind']!r}")

    @classmethod
    def from_text(cls, kind, text):
        if kind == 'char':
            return cls({'kind': 'char', 'chars': ''.join(sorted(set(text)))})
        if kind == 'bpe':
            return cls({'kind': 'bpe', 'encoding': BPE_ENCODING})
        return cls({'kind': 'hf', 'name': kind})  # a Hugging Face tokenizer's name

    def encode(self, text):
        if self.meta['kind'] == 'char':
            unknown = sorted(set(text) - self.stoi.keys())
            if unknown:
                raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
            return [self.stoi[c] for c in text]
        if self.meta['kind'] == 'hf':
            return self.enc.encode(text, add_special_tokens=False)
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        if self.meta['kind'] == 'char':
            return ''.join(self.itos[i] for i in ids)
        return self.enc.decode(list(ids))


def read_corpus(input_path, dataset):
    """The text: the --input file if given, else the dataset's shipped text."""
    if not input_path and dataset not in DATASETS:
        raise FileNotFoundError(f"dataset {dataset!r} has no text of its own; pass --input=FILE")
    path = input_path or DATASETS[dataset][0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text:
        raise ValueError(f"{path} is empty: nothing to prepare")
    return text


def prepare(text, out_dir, tokenizer='char', val_fraction=0.1):
    """Tokenize `text`, split train/val, write the bins and meta.json (switch_in: a reader sees
    the whole old dataset or the whole new one, never a mix). Returns a summary dict."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = Tokenizer.from_text(tokenizer, text)
    if tok.vocab_size > 2 ** 16:
        raise ValueError(f"vocabulary of {tok.vocab_size} tokens does not fit uint16 "
                         f"(max 65536); use the bpe tokenizer or a smaller alphabet")
    split = int(len(text) * (1 - val_fraction))
    files, counts = {}, {}
    for name, part in (('train', text[:split]), ('val', text[split:])):
        ids = np.array(tok.encode(part), dtype=np.uint16)
        if len(ids) == 0:
            raise ValueError(f"the {name} split of a {len(text)}-character text is empty at "
                             f"val_fraction={val_fraction}: use a longer text")
        files[f'{name}.bin'], counts[name] = ids.tobytes(), len(ids)
    files['meta.json'] = json.dumps({**tok.meta, 'vocab_size': tok.vocab_size}).encode()
    switch_in(files, out_dir)
    return {'out_dir': out_dir, 'tokenizer': tokenizer, 'vocab_size': tok.vocab_size,
            'train_tokens': counts['train'], 'val_tokens': counts['val']}


# Switching a dataset in. Its three files are replaced one by one, so a plain write could leave a
# new train.bin beside an old val.bin (a kill), truncate the old data (a full disk) or a training
# run's memory-mapped file under it (SIGBUS). Instead: write every file as NAME.tmp.<pid>, create
# the commit mark switch.<pid>, rename the files over the old ones (a renamed-over file lives on
# for whoever has it open or mapped), delete the mark. recover() finishes a switch whose writer
# died after its mark and deletes the temporary files of one that died before.
DATASET_FILES = ('train.bin', 'val.bin', 'meta.json')


def switch_in(files, out_dir):
    """Write {name: bytes} into out_dir as one change (see above)."""
    os.makedirs(out_dir, exist_ok=True)
    recover(out_dir)
    pid, written = os.getpid(), []
    try:
        for name, data in files.items():
            written.append(os.path.join(out_dir, f'{name}.tmp.{pid}'))
            with open(written[-1], 'wb') as f:
                f.write(data)
        open(os.path.join(out_dir, f'switch.{pid}'), 'x').close()  # from here on: the new data
    except BaseException:
        for path in written:  # the old dataset is untouched: just drop the new files
            if os.path.exists(path):
                os.remove(path)
        raise
    finish_switch(out_dir, pid)


def finish_switch(out_dir, pid):
    """Rename the marked temporary files into place (the ones still there), then drop the mark."""
    with suppress(FileNotFoundError):  # (another process may be finishing the same switch)
        for name in DATASET_FILES:
            if os.path.exists(os.path.join(out_dir, f'{name}.tmp.{pid}')):
                os.replace(os.path.join(out_dir, f'{name}.tmp.{pid}'), os.path.join(out_dir, name))
        os.remove(os.path.join(out_dir, f'switch.{pid}'))


def recover(out_dir):
    """Complete the switches of dead writers that got as far as their mark, and delete the
    temporary files of those that did not (a kill -9 runs no clean-up)."""
    from common import pid_alive

    def dead_writer(path):  # (our own pid here is an earlier process's: we are not switching)
        pid = path.rsplit('.', 1)[1]
        return pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid)))
    for mark in glob.glob(os.path.join(glob.escape(out_dir), 'switch.*')):
        if dead_writer(mark):
            finish_switch(out_dir, mark.rsplit('.', 1)[1])
    for name in DATASET_FILES:
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), f'{name}.tmp.*')):
            if dead_writer(tmp):
                with suppress(OSError):  # (gone already, or a directory we may only read)
                    os.remove(tmp)


def load_meta(data_dir):
    """The tokenizer metadata of a prepared dataset."""
    with open(os.path.join(data_dir, 'meta.json')) as f:
        return json.load(f)


@dataclass
class PrepareConfig:
    """python data/prepare.py [--name=value ...]
Turn a text into data/<dataset>/{train.bin, val.bin, meta.json} (uint16 token ids + tokenizer)."""
    dataset: str = 'shakespeare_char'  # shakespeare_char | shakespeare (BPE) | any name with --input
    input: str = ''                 # a text file (default: the dataset's own, data/tinyshakespeare.txt)
    tokenizer: str = ''             # char | bpe | a Hugging Face name (default: the dataset's, else char)
    out_dir: str = ''               # where to write (default: data/<dataset>)
    val_fraction: float = 0.1       # the last part of the text that is the val split


def main(argv):
    from common import UserError
    try:
        run(argv)
    except (ValueError, OSError) as e:  # bad or missing files, a full disk: the user's to fix
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def run(argv):
    from common import parse_flags  # the --name=value parser every nanoMTP script shares
    args = parse_flags(argv, PrepareConfig())
    tokenizer = args.tokenizer or DATASETS.get(args.dataset, (None, 'char'))[1]
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.dataset)
    text = read_corpus(args.input, args.dataset)
    if tokenizer == 'bpe':  # tiktoken fetches its BPE file on first use: fail before any work
        try:
            Tokenizer.from_text('bpe', '')
        except Exception as e:
            raise ConnectionError(f"cannot load the BPE tokenizer ({type(e).__name__}); offline? "
                                  f"set TIKTOKEN_CACHE_DIR to a tiktoken cache")
    elif tokenizer != 'char':  # a Hugging Face tokenizer: transformers, and a download or copy
        try:
            Tokenizer.from_text(tokenizer, '')
        except ImportError:
            raise ValueError(f"--tokenizer={tokenizer} needs the optional package transformers "
                             f"(pip install transformers); or use char or bpe")
        except Exception as e:
            raise ValueError(f"cannot load the tokenizer {tokenizer!r} ({type(e).__name__}): "
                             f"not char, bpe, nor a Hugging Face tokenizer found (offline?)")
    summary = prepare(text, out_dir, tokenizer, args.val_fraction)
    print(f"{summary['train_tokens']:,} train and {summary['val_tokens']:,} val tokens, "
          f"vocab {summary['vocab_size']}, written to {out_dir}")
    print(json.dumps(summary))


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
    from common import cli
    cli(main)
