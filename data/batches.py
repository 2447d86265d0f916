"""
The training windows of a prepared dataset (train.py): Batches of random windows of a token
file, and load_data for train.py's flags. Imports: data.text, data.prepare <- data.batches.
"""
import os

import numpy as np
import torch

from model import UserError
from data.text import data_dir_of, load_meta, token_file
from data.prepare import recover


class Batches:
    """Random windows of a uint16 token file; the generator state is saved in checkpoints, so a
    resumed run draws the same batches. Documents (doc_len > 0, distill.py): every window starts
    at a document's start, and targets past its end or among its first doc_prompt tokens are -1
    (neither loss nor accuracy). Head k > 1 at the last k - 1 prompt positions still predicts a
    generated token: k - 1 targets per document, about 1% at distill.py's defaults."""

    def __init__(self, path, block_size, batch_size, device, seed, doc_len=0, doc_prompt=0):
        if not os.path.isfile(path):
            raise UserError(f"data file not found: {path}; run `python data/prepare.py` first "
                            f"(or --input=FILE for a local text)")
        self.data = token_file(path)
        if len(self.data) < (doc_len or block_size + 2):
            raise UserError(f"{path} has {len(self.data)} tokens: too few for block_size "
                            f"{block_size}")
        if doc_len and len(self.data) % doc_len:
            raise UserError(f"{path} ({len(self.data)} tokens) is not a run of documents of "
                            f"doc_len={doc_len} tokens")
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.doc_len, self.doc_prompt = doc_len, doc_prompt
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
    args = (cfg.block_size, cfg.batch_size, device)
    docs = dict(doc_len=cfg.doc_len, doc_prompt=cfg.doc_prompt)
    split = lambda name: os.path.join(data_dir, f'{name}.bin')  # noqa: E731
    recover(data_dir)  # a prepare.py killed while swapping the dataset in: finish it first
    return (load_meta(data_dir), Batches(split('train'), *args, cfg.seed + rank, **docs),
            Batches(split('val'), *args, 0, **docs), Batches(split('train'), *args, 0, **docs))
