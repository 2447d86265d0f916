"""
Self-distillation of the MTP heads: heads 2..n learn to draft what the model itself will say.

    python distill.py --ckpt=out/ckpt.pt                      # -> out-distill/ckpt.pt
    python distill.py --ckpt=out/ckpt.pt --temperature=1 --out_dir=out-distill-t1

A draft is accepted when it agrees with the MODEL's own next tokens, but heads trained on the
corpus learn the DATA's p(x_{t+k} | x<=t). So (Medusa-2's self-distillation, Cai et al. 2024) the
model writes its own corpus, prompts of real text continued at --temperature (batched
self-speculative decoding: distributed exactly as vanilla sampling), and train.py fine-tunes heads
2..n on it with trunk and head 1 frozen: the next-token distribution stays bit-identical, so
decoding stays exactly as lossless; only the drafts get better. At temperature 0, x_{t+k} of the
corpus IS the greedy continuation, what greedy verification accepts; at 1 it is a sample of the
model's own p(x_{t+k} | x<=t) = sum_v p(v | x<=t) p(x_{t+k} | x<=t, v), so cross-entropy fits the
heads to the q that lossless sampling wants.
"""
import json
import os
import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from tqdm import tqdm

from heads import loss_weights_for, parse_loss_weights
from common import (UserError, TrainConfig, flag, parse_flags, check_ranges, pick_device,
                    autocast_for, load_model, cli)
from writers import writing
from data.text import data_dir_of, val_path, val_prompts
from data.prepare import switch_in
from batched import generate_batch, self_drafter
from train import train, check_config
from report import printable


@dataclass
class DistillConfig(TrainConfig):
    """python distill.py --ckpt=out/ckpt.pt [--name=value ...]
Self-distillation: the model writes its own corpus, heads 2..n learn it (trunk, head 1 frozen)."""
    ckpt: str = flag('out/ckpt.pt', "the MTP checkpoint to distill")
    num_sequences: int = flag(4096, "training documents to generate")
    val_sequences: int = flag(256, "validation documents to generate")
    prompt_len: int = flag(32, "tokens of real text that start each document")
    seq_len: int = flag(256, "tokens per document (prompt + generated), <= block_size")
    temperature: float = flag(0.0, "of the generation (0 = greedy: heads learn greedy drafts)")
    top_k: int = flag(0, "of the generation (0 = off)")
    top_p: float = flag(1.0, "of the generation (1 = off)")
    gen_batch: int = flag(64, "documents generated at once")
    # the fine-tuning: train.py's flags, with these defaults (heads 2..n only, a short run)
    out_dir: str = flag('out-distill', "corpus -> <out_dir>/data/, model -> <out_dir>/ckpt.pt")
    max_iters: int = flag(2000, "fine-tuning iterations")
    batch_size: int = flag(16, "documents per step")
    learning_rate: float = flag(1e-3, "peak LR of the heads")
    min_lr: float = flag(1e-4, "LR at the end of the cosine decay")
    loss_weights: str = flag('', "lambda_1..lambda_n; default 0,1,..,1 (must start with 0)")
    seed: int = flag(1337, "of the prompts, the generation and the fine-tuning")


# train.py flags this script decides itself: the data, the model (its shape) and what is frozen
FIXED = ('init_from', 'data_dir', 'dataset', 'block_size', 'doc_len', 'doc_prompt', 'n_layer',
         'n_head', 'n_embd', 'bias', 'n_future', 'attach_layer', 'head_type', 'whs',
         'head_attention', 'mtp_weight', 'mtp_decay', 'freeze_trunk', 'head_warmup_iters',
         'trunk_lr_scale', 'loss_schedule', 'schedule_frac')


def write_corpus(model, prompts, args, generator, name):
    """Continue every prompt to seq_len tokens: the documents one after another, uint16 bytes.
    Batched self-speculative decoding (batched.generate_batch): each row distributed exactly as
    vanilla sampling (greedy: vanilla's tokens), the heads drafting as they will when decoding."""
    new_tokens, n_drafts, docs = args.seq_len - args.prompt_len, model.config.n_future - 1, []
    for i in tqdm(range(0, len(prompts), args.gen_batch), desc=name, dynamic_ncols=True,
                  disable=args.quiet):
        batch = prompts[i:i + args.gen_batch]
        rows = generate_batch(model, batch, new_tokens, args.temperature, args.top_k,
                              args.top_p, generator=generator, n_drafts=n_drafts,
                              make_drafter=self_drafter(model))
        docs += [prompt + row.tokens for prompt, row in zip(batch, rows)]
    return np.array(docs, dtype=np.uint16).tobytes()


def write_corpora(model, ckpt, source_val, args, cfg, device):
    """The train and val corpora, prompts cut from the checkpoint's own data, and a meta.json
    naming the tokenizer and where the real text is: prompts and evaluations of the distilled
    model (bench.py, marginalize.py) use that, not this corpus (data.text.val_path). The three
    files are switched in at once (data.prepare.switch_in): a failed write leaves the old ones.
    Seconds."""
    generator, t0, files = torch.Generator(device).manual_seed(cfg.seed), time.time(), {}
    with autocast_for(cfg.dtype, device):
        for split, n in (('train', args.num_sequences), ('val', args.val_sequences)):
            source = os.path.join(os.path.dirname(source_val), f'{split}.bin')
            starts = torch.Generator().manual_seed(cfg.seed + (split == 'val'))
            prompts = val_prompts(ckpt, source, n, args.prompt_len, starts, hint=(
                "prompts are cut from the checkpoint's data: run data/prepare.py for its dataset"))
            files[f'{split}.bin'] = write_corpus(model, prompts, args, generator, split)
    files['meta.json'] = json.dumps({**ckpt['meta'], 'source_data': os.path.dirname(
        os.path.abspath(source_val))}).encode()
    try:
        switch_in(files, cfg.data_dir)
    except OSError as e:  # (a full disk, a file-size limit)
        raise UserError(f"cannot write the corpus into {cfg.data_dir} ({e.strerror or e}): the "
                        f"files there are unchanged")
    return time.time() - t0


def fine_tuning_config(args, model_config):
    """train.py's config for the fine-tuning: each document (prompt + continuation) is one
    training window whose prompt is not learned; heads 2..n only (lambda_1 = 0, frozen trunk)."""
    n_future = model_config.n_future
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    cfg = replace(cfg, init_from=args.ckpt, data_dir=os.path.join(args.out_dir, 'data'),
                  head_type=model_config.head_type,  # (the checkpoint's: fine-tuned whole)
                  head_attention=model_config.head_attention, freeze_trunk=True,
                  block_size=args.seq_len, doc_len=args.seq_len, doc_prompt=args.prompt_len,
                  loss_weights=cfg.loss_weights or ','.join(['0'] + ['1'] * (n_future - 1)))
    if loss_weights_for(n_future, parse_loss_weights(cfg.loss_weights))[0] != 0:
        raise UserError("distill.py keeps the model's next-token head as it is: loss_weights must "
                        "start with 0 (train other heads with train.py)")
    check_config(cfg)  # every training flag is checked before minutes of generation
    return cfg


def main(argv):
    args = parse_flags(argv, DistillConfig(), fixed=FIXED)
    check_ranges(args, positive=('num_sequences', 'val_sequences', 'prompt_len', 'gen_batch'))
    if args.seq_len <= args.prompt_len:
        raise UserError(f"seq_len ({args.seq_len}) must exceed prompt_len "
                        f"({args.prompt_len}): the generated tokens are the corpus")
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    n_future, block_size = model.config.n_future, model.config.block_size
    if n_future < 2:
        raise UserError("the checkpoint has no MTP heads (n_future=1): nothing to distill; train "
                        "heads first (train.py --init_from=... --n_future=4)")
    if not n_future < args.seq_len <= block_size:
        raise UserError(f"seq_len {args.seq_len} must be in {n_future + 1}..{block_size} (more "
                        f"than the {n_future} heads, at most the model's block_size)")
    cfg = fine_tuning_config(args, model.config)
    source_val = val_path(ckpt)
    if not source_val:
        raise UserError("the checkpoint names no dataset to cut prompts from")
    config = ckpt.get('config') or {}
    read = {os.path.dirname(os.path.realpath(source_val))} | ({os.path.realpath(data_dir_of(
        config.get('dataset', ''), config.get('data_dir', '')))} if config.get('dataset') or
        config.get('data_dir') else set())
    if os.path.realpath(cfg.data_dir) in read:
        raise UserError(f"--out_dir={args.out_dir} would write the corpus over {cfg.data_dir}, "
                        f"data the checkpoint was trained on: pick another --out_dir")
    with writing(args.out_dir, 'out_dir'), writing(cfg.data_dir, 'dataset'):
        corpus_s = write_corpora(model, ckpt, source_val, args, cfg, device)
        del model, ckpt  # train() loads the checkpoint again
        summary = printable(train(cfg))
    print(json.dumps(dict(corpus_dir=cfg.data_dir, corpus_s=corpus_s,
                          corpus_tokens=args.num_sequences * args.seq_len,
                          temperature=args.temperature, loss_weights=cfg.loss_weights, **summary)))


if __name__ == '__main__':
    cli(main)
