"""Turn a text corpus into train.bin / val.bin (uint16 token ids) and meta.json (the tokenizer).

    python data/prepare.py                                  # shakespeare_char
    python data/prepare.py --dataset=shakespeare            # GPT-2 BPE (tiktoken r50k_base)
    python data/prepare.py --dataset=mytext --input=my.txt --tokenizer=char
    python data/prepare.py --dataset=pile --input=my.txt --tokenizer=EleutherAI/pythia-70m  # (*)

(*) any Hugging Face tokenizer, by name or local directory (the optional transformers; needs the
network or a local copy). Offline, tiktoken's BPE needs TIKTOKEN_CACHE_DIR set to a cache.
train.py reads a prepared dataset with load_data: Batches of random windows of its token files."""
import glob
import json
import os
import sys
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import torch

if __name__ == '__main__':  # a script in data/: the project's modules are one directory up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import UserError, flag, parse_flags, cli  # noqa: E402
from writers import dead_writer, remove_stale_temps, leave_mark, writing, check_file  # noqa: E402
from data.text import DATA, Tokenizer, data_dir_of, load_meta, read_text, token_file  # noqa: E402

SHAKESPEARE = os.path.join(DATA, 'tinyshakespeare.txt')
# known datasets: name -> (their text, shipped in data/, tokenizer)
DATASETS = {'shakespeare_char': (SHAKESPEARE, 'char'), 'shakespeare': (SHAKESPEARE, 'bpe')}
DATASET_FILES = ('train.bin', 'val.bin', 'meta.json')  # a prepared dataset (switch_in)


def read_corpus(input_path, dataset):
    if not input_path and dataset not in DATASETS:
        raise FileNotFoundError(f"dataset {dataset!r} has no text of its own; pass --input=FILE")
    path = input_path or DATASETS[dataset][0]
    text = read_text(path)
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


def switch_in(files, out_dir):
    """Write {name: bytes} of DATASET_FILES into out_dir as one change. Written one by one in
    place, they could leave a new train.bin beside an old val.bin (a kill), truncate the old data
    (a full disk) or a training run's memory-mapped file under it (SIGBUS). Instead: write each
    as NAME.tmp.<pid>, create the commit mark switch.<pid>, rename the files over the old ones
    (a renamed-over file lives on for whoever has it open or mapped), delete the mark."""
    os.makedirs(out_dir, exist_ok=True)
    recover(out_dir)
    pid = os.getpid()
    try:
        for name, data in files.items():
            with open(os.path.join(out_dir, f'{name}.tmp.{pid}'), 'wb') as f:
                f.write(data)
        leave_mark(os.path.join(out_dir, f'switch.{pid}'))  # from here on: the new data
    finally:  # (our pid counts as a dead writer's: its switch is finished, or its files dropped)
        recover(out_dir)


def recover(out_dir):
    """Finish the switches of dead writers that got as far as their mark (rename the files still
    there into place, then drop the mark), delete the temporary files of those that did not (a
    kill -9 runs no clean-up). Our own pid counts as a dead writer's."""
    for mark in glob.glob(os.path.join(glob.escape(out_dir), 'switch.*')):
        if dead_writer(mark, mine=True):
            with suppress(FileNotFoundError):  # (another process may be finishing it too)
                for name in DATASET_FILES:
                    tmp = os.path.join(out_dir, f"{name}.tmp.{mark.rsplit('.', 1)[1]}")
                    if os.path.exists(tmp):
                        os.replace(tmp, os.path.join(out_dir, name))
                os.remove(mark)
    for name in DATASET_FILES:
        remove_stale_temps(os.path.join(out_dir, name), mine=True)


class Batches:
    """Random windows of a uint16 token file; the generator state is saved in checkpoints, so a
    resumed run draws the same batches. Documents (doc_len > 0, distill.py): every window starts
    at a document's start, and targets past its end or among its first doc_prompt tokens are -1
    (neither loss nor accuracy). Head k > 1 at the last k - 1 prompt positions still predicts a
    generated token: k - 1 targets per document, about 1% at distill.py's defaults."""

    def __init__(self, path, block_size, batch_size, device, seed, doc_len=0, doc_prompt=0):
        check_file(path, 'data file', "run `python data/prepare.py` first (or --input=FILE for "
                                      "a local text)")
        self.data = token_file(path)
        if len(self.data) < (doc_len or block_size + 2):
            raise UserError(f"{path} has {len(self.data)} tokens: too few for block_size "
                            f"{block_size}")
        if doc_len and len(self.data) % doc_len:
            raise UserError(f"{path} ({len(self.data)} tokens) is not a run of documents of "
                            f"doc_len={doc_len} tokens")
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.device, self.doc_len, self.doc_prompt = device, doc_len, doc_prompt
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        n = len(self.data) // self.doc_len if self.doc_len else len(self.data) - self.block_size
        ix = torch.randint(n, (self.batch_size,), generator=self.gen) * max(self.doc_len, 1)
        # block_size + 1 tokens from each start (one fewer for the file's last document)
        windows = torch.full((self.batch_size, self.block_size + 1), -1, dtype=torch.long)
        for row, i in enumerate(ix.tolist()):
            tokens = self.data[i:i + self.block_size + 1].astype(np.int64)
            windows[row, :len(tokens)] = torch.from_numpy(tokens)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.doc_len:  # y[t] is token t + 1 of the document
            y[:, :max(0, self.doc_prompt - 1)] = -1
            y[:, self.doc_len - 1:] = -1
        if 'cuda' in str(self.device):  # pinned memory + non_blocking: copy overlaps compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        return x.to(self.device), y.to(self.device)


def load_data(cfg, device, rank):
    """For train.py's cfg: (meta, training batches, fixed val and train batches to evaluate)."""
    data_dir = data_dir_of(cfg.dataset, cfg.data_dir)
    if not os.path.isfile(os.path.join(data_dir, 'meta.json')):
        raise UserError(f"no prepared data in {data_dir}: run `python data/prepare.py "
                        f"--dataset={cfg.dataset}` (add --input=FILE to use a local text file)")
    recover(data_dir)  # a prepare.py killed while swapping the dataset in: finish it first
    meta = load_meta(data_dir)
    train, val, eval_train = (
        Batches(os.path.join(data_dir, f'{split}.bin'), cfg.block_size, cfg.batch_size, device,
                seed, cfg.doc_len, cfg.doc_prompt)
        for split, seed in (('train', cfg.seed + rank), ('val', 0), ('train', 0)))
    for batches in (train, val):  # ids its tokenizer cannot have
        if int(batches.data.max()) >= meta['vocab_size']:
            raise UserError(f"{batches.path} holds token ids up to {int(batches.data.max())}, "
                            f"beyond its meta.json's vocab_size {meta['vocab_size']}: re-run "
                            f"data/prepare.py for {data_dir}")
    return meta, train, val, eval_train


@dataclass
class PrepareConfig:
    """python data/prepare.py [--name=value ...]
Turn a text into data/<dataset>/{train.bin, val.bin, meta.json} (uint16 token ids + tokenizer)."""
    dataset: str = flag('shakespeare_char',
                        "shakespeare_char | shakespeare (BPE) | any name with --input")
    input: str = flag('', "a text file (default: the dataset's own, data/tinyshakespeare.txt)")
    tokenizer: str = flag('', "char | bpe | a Hugging Face name (default: dataset's, else char)")
    out_dir: str = flag('', "where to write (default: data/<dataset>)")
    val_fraction: float = flag(0.1, "the last part of the text that is the val split")


def main(argv):
    args = parse_flags(argv, PrepareConfig())
    tokenizer = args.tokenizer or DATASETS.get(args.dataset, (None, 'char'))[1]
    out_dir = args.out_dir or data_dir_of(args.dataset)
    try:  # bad or missing files, a full disk: the user's to fix
        text = read_corpus(args.input, args.dataset)
        try:  # load the tokenizer before any work (tiktoken fetches its BPE file on first use)
            Tokenizer.from_text(tokenizer, '')
        except Exception as e:
            if tokenizer == 'bpe':
                raise UserError(f"cannot load the BPE tokenizer ({type(e).__name__}); offline? "
                                f"set TIKTOKEN_CACHE_DIR to a tiktoken cache")
            if isinstance(e, ImportError):
                raise UserError(f"--tokenizer={tokenizer} needs the optional package "
                                f"transformers (pip install transformers); or use char or bpe")
            raise UserError(f"cannot load the tokenizer {tokenizer!r} ({type(e).__name__}): "
                            f"not char, bpe, nor a Hugging Face tokenizer found (offline?)")
        with writing(out_dir, 'dataset'):  # (a second prepare of it: a one-line error)
            summary = prepare(text, out_dir, tokenizer, args.val_fraction)
    except (ValueError, OSError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    print(f"{summary['train_tokens']:,} train and {summary['val_tokens']:,} val tokens, "
          f"vocab {summary['vocab_size']}, written to {out_dir}")
    print(json.dumps(summary))


if __name__ == '__main__':
    cli(main)
