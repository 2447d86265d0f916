"""
Self-distillation of the MTP heads: heads 2..n learn to draft what the model itself will say.

    python distill.py --ckpt=out/ckpt.pt                      # -> out-distill/ckpt.pt
    python distill.py --ckpt=out/ckpt.pt --temperature=1 --out_dir=out-distill-t1

Why. Speculative decoding accepts a draft when it agrees with the model's own next tokens, not
with the data. Heads trained on the corpus learn the DATA's p(x_{t+i} | x<=t); what the verifier
accepts is the MODEL's continuation. So (the self-distillation of Medusa-2, Cai et al. 2024):

  1. the model writes its own corpus: num_sequences prompts of prompt_len tokens, cut from the
     checkpoint's training data (validation data for val.bin), each continued by vanilla
     decoding (sample.generate_batch) to seq_len tokens at --temperature;
  2. train.py fine-tunes heads 2..n on it with the trunk and head 1 frozen (freeze_trunk, and
     lambda_1 = 0, which freezes head 1): the next-token distribution of the output
     checkpoint is bit-identical to the input's, so vanilla decoding is unchanged and
     speculative decoding stays exactly as lossless; only the drafts get better.

What the heads learn. temperature 0: each generated token is the argmax given its prefix, so
x_{t+i} in the corpus IS the greedy continuation of x<=t -- exactly what greedy verification
accepts. temperature 1: x_{t+i} is a sample of the model's own marginal
p(x_{t+i} | x<=t) = sum_v p(v | x<=t) p(x_{t+i} | x<=t, v) (what marginalize.py computes exactly),
so cross-entropy fits the heads to that marginal: the q that lossless sampling wants.
Only the generated tokens are learned: each sequence is one training window, and the targets
inside its prompt (real text) are ignored (train.py's doc_len / doc_prompt).

Flags: ckpt, num_sequences, val_sequences, prompt_len, seq_len (prompt + generated; <= the
model's block_size), temperature, top_k, top_p, gen_batch (sequences generated at once), plus
train.py's optimization flags for the fine-tuning (out_dir, max_iters, learning_rate, batch_size,
eval_interval, device, dtype, ...; loss_weights defaults to 0,1,..,1 and must start with 0). The
model's shape and what is frozen are not flags here. The corpus goes to <out_dir>/data/, the
model to <out_dir>/ckpt.pt. The last line is a JSON summary.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from model import UserError, parse_flags, pick_device, autocast_for
from heads import load_model, val_path, loss_weights_for
from sample import generate_batch
from train import TrainConfig, train, printable, check_config

GEN_FLAGS = dict(ckpt='out/ckpt.pt', num_sequences=4096, val_sequences=256, prompt_len=32,
                 seq_len=256, temperature=0.0, top_k=0, top_p=1.0, gen_batch=64)
# the fine-tuning: heads 2..n only, a short run. The data, the model (its shape included) and
# the frozen parts are this script's business, so those train.py flags are not taken here.
TRAIN_DEFAULTS = asdict(TrainConfig(out_dir='out-distill', freeze_trunk=True, max_iters=2000,
                                    batch_size=16, learning_rate=1e-3, min_lr=1e-4,
                                    eval_interval=500))
for fixed in ('init_from', 'data_dir', 'dataset', 'block_size', 'doc_len', 'doc_prompt',
              'n_layer', 'n_head', 'n_embd', 'bias', 'n_future', 'attach_layer', 'head_type',
              'whs', 'mtp_weight', 'mtp_decay', 'freeze_trunk', 'head_warmup_iters',
              'trunk_lr_scale'):
    del TRAIN_DEFAULTS[fixed]


def prompt_windows(data_path, n, prompt_len, generator):
    """n random windows of prompt_len tokens from a token file: (n, prompt_len) int64."""
    if not os.path.isfile(data_path):
        raise UserError(f"the checkpoint's data is not found: {data_path} (prompts are cut from "
                        f"it; run data/prepare.py for its dataset)")
    data = np.memmap(data_path, dtype=np.uint16, mode='r')
    if len(data) < prompt_len:
        raise UserError(f"{data_path} has {len(data)} tokens, fewer than prompt_len {prompt_len}")
    starts = torch.randint(len(data) - prompt_len + 1, (n,), generator=generator).tolist()
    return torch.stack([torch.from_numpy(data[s:s + prompt_len].astype(np.int64))
                        for s in starts])


def write_corpus(model, prompts, path, args, device, generator):
    """Continue every prompt to seq_len tokens and write them, one after another, as uint16."""
    new_tokens = args['seq_len'] - args['prompt_len']
    with open(path + '.tmp', 'wb') as f:
        for batch in tqdm(prompts.split(args['gen_batch']), desc=os.path.basename(path),
                          dynamic_ncols=True, disable=args['quiet']):
            seqs = generate_batch(model, batch.to(device), new_tokens, args['temperature'],
                                  args['top_k'], args['top_p'], generator)
            f.write(seqs.cpu().numpy().astype(np.uint16).tobytes())
    os.replace(path + '.tmp', path)  # a half-written corpus never looks finished


def main(argv):
    args = parse_flags(argv, {**GEN_FLAGS, **TRAIN_DEFAULTS})
    # each document (prompt + continuation) is one training window; the prompt is not learned
    cfg = TrainConfig(**{k: args[k] for k in TRAIN_DEFAULTS}, init_from=args['ckpt'],
                      data_dir=os.path.join(args['out_dir'], 'data'), block_size=args['seq_len'],
                      doc_len=args['seq_len'], doc_prompt=args['prompt_len'], freeze_trunk=True)
    for name in ('num_sequences', 'val_sequences', 'prompt_len', 'gen_batch'):
        if args[name] < 1:
            raise UserError(f"{name} must be >= 1")
    if args['seq_len'] <= args['prompt_len']:
        raise UserError(f"seq_len ({args['seq_len']}) must exceed prompt_len "
                        f"({args['prompt_len']}): the generated tokens are the corpus")
    device = pick_device(cfg.device)
    model, ckpt = load_model(args['ckpt'], device)
    n_future = model.config.n_future
    if n_future < 2:
        raise UserError("the checkpoint has no MTP heads (n_future=1): nothing to distill; train "
                        "heads first (train.py --init_from=... --n_future=4)")
    if not n_future < args['seq_len'] <= model.config.block_size:
        raise UserError(f"seq_len {args['seq_len']} must be in {n_future + 1}.."
                        f"{model.config.block_size} (more than the {n_future} heads, at most the "
                        f"model's block_size)")
    if not cfg.loss_weights:
        cfg.loss_weights = ','.join(['0'] + ['1'] * (n_future - 1))  # head 1 stays as it is
    try:
        weights = loss_weights_for(n_future, [float(w) for w in cfg.loss_weights.split(',')])
    except ValueError:
        raise UserError(f"loss_weights must be comma-separated numbers, got {cfg.loss_weights!r}")
    if weights[0] != 0:
        raise UserError("distill.py keeps the model's next-token head as it is: loss_weights must "
                        "start with 0 (train other heads with train.py)")
    check_config(cfg)  # every training flag is checked before minutes of generation
    source_val = val_path(ckpt)
    if not source_val:
        raise UserError("the checkpoint names no dataset to cut prompts from")
    generator = torch.Generator(device).manual_seed(cfg.seed)
    os.makedirs(cfg.data_dir, exist_ok=True)
    t0 = time.time()
    with autocast_for(cfg.dtype, device):
        for split, n in (('train', args['num_sequences']), ('val', args['val_sequences'])):
            source = os.path.join(os.path.dirname(source_val), f'{split}.bin')
            prompts = prompt_windows(source, n, args['prompt_len'],
                                     torch.Generator().manual_seed(cfg.seed + (split == 'val')))
            write_corpus(model, prompts, os.path.join(cfg.data_dir, f'{split}.bin'), args,
                         device, generator)
    # the tokenizer, and where the real text is: prompts and evaluations of the distilled model
    # (bench.py, marginalize.py) use that, not this model-written corpus (heads.val_path)
    meta = {**ckpt['meta'], 'source_data': os.path.dirname(os.path.abspath(source_val))}
    with open(os.path.join(cfg.data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    corpus_s = time.time() - t0
    del model, ckpt  # train() loads the checkpoint again
    summary = printable(train(cfg))
    print(json.dumps(dict(corpus_dir=cfg.data_dir, corpus_s=corpus_s,
                          corpus_tokens=args['num_sequences'] * args['seq_len'],
                          temperature=args['temperature'], loss_weights=cfg.loss_weights,
                          **summary)))


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
