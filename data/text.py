"""Text and tokens: the tokenizers (described by a dataset's meta.json), text files, token files
(data/prepare.py's uint16 .bin), the data a checkpoint was trained on, prompts and stop
sequences. Imports: model <- data.text <- data.prepare, metrics, scripts."""
import json
import os

import numpy as np
import torch

from model import UserError
from writers import check_file

DATA = os.path.dirname(os.path.abspath(__file__))  # data/: a dataset's files are data/<dataset>
BPE_ENCODING = 'r50k_base'  # GPT-2's BPE (identical to tiktoken's "gpt2")
KINDS = ('char', 'bpe', 'hf', 'synthetic')  # tokenizers (synthetic: bench.py's random ids)


class Tokenizer:
    """encode(str) -> list[int] and decode(list[int]) -> str of a meta dict: {'kind': 'char',
    'chars': ...}, {'kind': 'bpe', 'encoding': 'r50k_base'} or {'kind': 'hf', 'name': ...}."""

    def __init__(self, meta):
        self.meta = meta
        if meta['kind'] == 'char':
            self.itos, self.eot, self.vocab_size = meta['chars'], None, len(meta['chars'])
            self.stoi = {ch: i for i, ch in enumerate(self.itos)}
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
            if unknown:  # (the first 20: a binary file's list would run to pages)
                more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ''
                raise ValueError(f"characters not in the vocabulary: {''.join(unknown[:20])!r}"
                                 f"{more}")
            return [self.stoi[c] for c in text]
        if self.meta['kind'] == 'hf':
            return self.enc.encode(text, add_special_tokens=False)
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        if self.meta['kind'] == 'char':
            return ''.join(self.itos[i] for i in ids)
        return self.enc.decode(list(ids))


def load_meta(data_dir):
    """A dataset's meta.json, checked when read: JSON naming a tokenizer kind and an integer
    vocab_size (a char tokenizer's characters are exactly its vocabulary; BPE is GPT-2's)."""
    path = os.path.join(data_dir, 'meta.json')
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): re-run data/prepare.py")
    size = meta.get('vocab_size') if isinstance(meta, dict) else None
    if not (type(size) is int and size > 0 and meta.get('kind') in KINDS and (
            meta['kind'] != 'char' or len(str(meta.get('chars', ''))) == size) and (
            meta['kind'] != 'bpe' or (meta.get('encoding'), size) == (BPE_ENCODING, 50257))):
        raise UserError(f"{path} is not a dataset's meta.json (a tokenizer kind of "
                        f"{', '.join(KINDS)} and its vocab_size): re-run data/prepare.py")
    return meta


def data_dir_of(dataset, data_dir=''):
    """Where a dataset's train.bin / val.bin / meta.json live: data_dir, or data/<dataset>, a
    dataset being a folder's name (not '', '.', '..' or a path: those would write into data/)."""
    if not data_dir and (dataset in ('', '.', '..') or '/' in dataset or os.sep in dataset):
        raise UserError(f"the dataset {dataset!r} must name a folder in data/: give another "
                        f"--dataset, or --data_dir (prepare.py: --out_dir)")
    return data_dir or os.path.join(DATA, dataset)


def val_path(ckpt, data_dir=''):
    """The val.bin of data_dir, else of the checkpoint's text (meta's source_data: the real text of
    a model-written corpus), its config's data_dir or data/<dataset>; '' when it names none."""
    config, meta = ckpt.get('config') or {}, ckpt.get('meta') or {}
    data_dir = data_dir or meta.get('source_data') or config.get('data_dir') or (
        data_dir_of(config['dataset']) if config.get('dataset') else '')
    return os.path.join(data_dir, 'val.bin') if data_dir else ''


def tokenizer_for(ckpt):
    if not ckpt.get('meta'):
        raise UserError("the checkpoint has no tokenizer metadata (meta): cannot encode text")
    kind = ckpt['meta'].get('kind')
    if kind not in KINDS[:3]:
        raise UserError(f"the checkpoint's tokenizer kind {kind!r} is not one of char, bpe, hf")
    try:
        tokenizer = Tokenizer(ckpt['meta'])
    except Exception as e:
        hint = ("a Hugging Face tokenizer needs transformers and a download or local copy"
                if kind == 'hf' else "set TIKTOKEN_CACHE_DIR to a tiktoken cache")
        first = (str(e).splitlines() or [''])[0][:120]
        raise UserError(f"cannot load the tokenizer ({type(e).__name__}: {first}); offline? {hint}")
    model = (ckpt.get('model_args') or {}).get('vocab_size', tokenizer.vocab_size)
    if tokenizer.vocab_size > model or (kind != 'hf' and tokenizer.vocab_size != model):
        raise UserError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, its model "
                        f"{model}: its meta names another tokenizer than the model's")
    return tokenizer


def tokenizer_difference(meta, other):
    """How two metas' tokenizers differ ('' if not): kind, encoding, vocab_size (not of Hugging
    Face models: Pythia's embedding is padded to 50304 rows), characters; other keys don't count."""
    hf = (meta or {}).get('kind') == 'hf'
    for key in ('kind', 'encoding') + (() if hf else ('vocab_size',)) + ('chars',):
        a, b = ((m or {}).get(key) for m in (meta, other))
        if a != b:
            shown = [repr(v[:16] + '...' if isinstance(v, str) and len(v) > 19 else v)
                     for v in (a, b)]
            return f"{key} {shown[0]} vs {shown[1]}"
    return ''


def check_data_tokenizer(ckpt, meta, data_dir):
    """Resuming or adapting a checkpoint on data_dir (meta: its meta.json): the same vocab_size
    is not enough, every id must mean the same token (a meta without a kind: vocab_size only)."""
    known = (ckpt.get('meta') or {}).get('kind') and meta.get('kind')
    if known and (why := tokenizer_difference(ckpt['meta'], meta)):
        raise UserError(f"the checkpoint's tokenizer differs from the dataset's in {data_dir} "
                        f"({why}): train on data prepared with the checkpoint's tokenizer")


def check_draft(ckpt, draft_ckpt, what='draft'):
    """A draft model (or transformers' assistant) shares the target's tokenizer, not just its
    vocabulary size."""
    if why := tokenizer_difference(draft_ckpt.get('meta'), ckpt.get('meta')):
        raise UserError(f"the {what} checkpoint's tokenizer differs from the target's ({why})")


def frequent_tokens(ckpt, n):
    """The n most frequent token ids of the checkpoint's training data (train.bin beside its
    val.bin; ties: the smaller id first), sorted: a draft vocabulary (drafters.DraftVocab)."""
    path = os.path.join(os.path.dirname(val_path(ckpt)), 'train.bin')
    tokens = tokens_for(ckpt, path, "--draft_vocab counts the checkpoint's training data: run "
                                    "data/prepare.py for its dataset")
    counts = np.bincount(tokens, minlength=ckpt['model_args']['vocab_size'])
    return np.sort(np.argsort(-counts, kind='stable')[:n])


def tokens_for(ckpt, path, hint):
    """The ids of a .bin file, checked to be the checkpoint's tokenizer's (every script's check):
    the meta.json beside it, if any, names that tokenizer; every id is below the vocab_size."""
    check_file(path, 'token file', hint)
    folder = os.path.dirname(path) or '.'
    if ckpt.get('meta') and os.path.isfile(os.path.join(folder, 'meta.json')):
        if why := tokenizer_difference(ckpt['meta'], load_meta(folder)):
            raise UserError(f"{path} was prepared with another tokenizer than the checkpoint's "
                            f"({why}); {hint}")
    tokens, vocab_size = token_file(path), (ckpt.get('model_args') or {}).get('vocab_size')
    if vocab_size and int(tokens.max()) >= vocab_size:
        raise UserError(f"{path} holds token ids up to {int(tokens.max())}, beyond the model's "
                        f"vocab_size {vocab_size}: not a token file of its tokenizer; {hint}")
    return tokens


def read_text(path, what='input file'):
    check_file(path, what)
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})")


def token_file(path):
    """The uint16 token ids of a .bin file (data/prepare.py's format), memory-mapped."""
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        what = 'empty' if size == 0 else 'not a uint16 token file (odd size)'
        raise UserError(f"{path} is {what}: re-run data/prepare.py for it")
    return np.memmap(path, dtype=np.uint16, mode='r')


def encode(tokenizer, text, what):
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise UserError(f"{what}: {e}")


def load_tokens(ckpt, vocab_size, input_path='', data_dir=''):
    """(token ids, where from): a text file, or the val.bin of data_dir or the checkpoint's."""
    source = input_path or val_path(ckpt, data_dir)
    if input_path:
        tokens = np.array(encode(tokenizer_for(ckpt), read_text(input_path),
                                 f"cannot tokenize {input_path}"), dtype=np.int64)
    else:
        tokens = tokens_for(ckpt, source, "pass --input=FILE or --data_dir=DIR")
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise UserError(f"{source} holds token ids >= the model's vocab_size {vocab_size}")
    return tokens, source


def val_prompts(ckpt, data_path, num_prompts, prompt_len, generator=None,
                hint='pass --data=path/to/val.bin'):
    """num_prompts windows of prompt_len tokens of a token file (default: the checkpoint's
    val.bin), evenly spaced, or at random starts drawn from generator."""
    data_path = data_path or val_path(ckpt)
    data = tokens_for(ckpt, data_path, hint)
    if len(data) < prompt_len or num_prompts < 1 or prompt_len < 1:
        raise UserError(f"cannot cut {num_prompts} prompts of {prompt_len} tokens from "
                        f"{data_path} ({len(data)} tokens)")
    starts = (np.linspace(0, len(data) - prompt_len, num_prompts).astype(int) if generator is None
              else torch.randint(len(data) - prompt_len + 1, (num_prompts,),
                                 generator=generator).tolist())
    return [data[s:s + prompt_len].astype(np.int64).tolist() for s in starts]


def encode_prompt(text, tokenizer):
    """Token ids of a prompt string (\\n, \\t: a newline, a tab, as in --stop) or FILE:path (as
    it is); empty: <|endoftext|> (BPE) or an error (char)."""
    text = (read_text(text.removeprefix('FILE:'), 'prompt file') if text.startswith('FILE:')
            else text.replace('\\n', '\n').replace('\\t', '\t'))
    if not text:
        if tokenizer.eot is None:
            raise UserError("empty prompt: a char model has no start token; give at least one "
                            "character (--prompt=...)")
        return [tokenizer.eot]
    return encode(tokenizer, text, 'prompt')


def stop_tokens(flag, tokenizer):
    """--stop: auto (<|endoftext|> for BPE, none for char) | none | a string."""
    if flag in ('auto', 'none', ''):
        return [tokenizer.eot] if flag == 'auto' and tokenizer.eot is not None else []
    return encode(tokenizer, flag.replace('\\n', '\n').replace('\\t', '\t'), 'stop')
