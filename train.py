"""
Train a GPT with multi-token prediction heads (n_future = 1 is plain next-token training).

    python train.py                                   # defaults: MTP from scratch, shakespeare_char
    python train.py config/ntp_shakespeare_char.py    # a preset file, then
    python train.py --n_future=1 --max_iters=500      # any field as --name=value
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (nccl on CUDA, gloo on CPU)

init_from: 'scratch' (random init), 'resume' (continue out_dir/ckpt.pt), a checkpoint path or
'gpt2' / 'gpt2-medium' / ... (adapt that NTP model: trunk = its first attach_layer blocks, every
head a copy of the rest; joint training unless freeze_trunk / head_warmup_iters say otherwise).
A checkpoint that has MTP heads already (n_future > 1) is fine-tuned whole, heads included.
The model shape of an adapted or fine-tuned model comes from its source, not from the flags.

loss_weights: a head with lambda_i = 0 is frozen (out of the loss and the optimizer), so
--freeze_trunk=true --loss_weights=0,1,1,1 trains heads 2..4 only: the model's next-token
distribution stays bit-identical (distill.py does this).
"""
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import numpy as np
import torch
from tqdm import tqdm

from model import (UserError, save_checkpoint, load_checkpoint, parse_flags, pick_device,
                   autocast_for)
from data.prepare import load_meta
from heads import (MTPGPT, MTPConfig, loss_weights_for, head_targets, count_topk, load_model,
                   model_from_checkpoint)

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = 'out'
    dataset: str = 'shakespeare_char'   # reads data/<dataset>/{train,val}.bin and meta.json
    data_dir: str = ''                  # overrides data/<dataset>
    init_from: str = 'scratch'          # scratch | resume | path/to/ckpt.pt | gpt2[-medium|-large|-xl]
    eval_interval: int = 500
    eval_iters: int = 20                # batches per split per evaluation
    log_interval: int = 10
    # data
    batch_size: int = 8
    block_size: int = 256
    grad_accum: int = 1                 # micro-batches per optimizer step (split across ranks)
    doc_len: int = 0                    # > 0: the corpus is documents of doc_len tokens (distill.py)
    doc_prompt: int = 0                 # ... whose first doc_prompt tokens are never targets
    # model (ignored when adapting a checkpoint: the source decides)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    # multi-token prediction
    n_future: int = 4                   # heads; head i predicts x_{t+i}
    attach_layer: int = -1              # trunk depth; -1 = n_layer-1 (block heads) / n_layer (linear)
    head_type: str = 'linear'           # linear (Medusa ResBlock: cheap drafts) | block (Gloeckle)
    whs: bool = False                   # weighted hidden states
    loss_weights: str = ''              # explicit lambda_1..lambda_n, comma separated
    mtp_weight: float = 1.0             # else lambda_1 = 1, lambda_i = mtp_weight * mtp_decay^(i-2)
    mtp_decay: float = 1.0
    memory_efficient: bool = False      # heads' forward+backward one at a time
    # training strategies of the paper (for adapted models)
    freeze_trunk: bool = False          # heads only
    head_warmup_iters: int = 0          # heads only for this many iterations, then joint
    trunk_lr_scale: float = 1.0         # differential LR: trunk LR = scale * head LR
    whs_lr_scale: float = 100.0         # WHS logits' LR = scale * head LR (see build_optimizer)
    # optimizer and schedule
    learning_rate: float = 2e-3
    max_iters: int = 3500
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # 0 disables
    warmup_iters: int = 100
    lr_decay_iters: int = -1            # -1: max_iters
    min_lr: float = 2e-4
    # system
    device: str = 'auto'                # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: str = 'auto'                 # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
    compile: bool = False               # torch.compile the model
    seed: int = 1337
    quiet: bool = False                 # no progress bar / log lines (the JSON line still prints)


# -----------------------------------------------------------------------------
# configuration: defaults < preset file < --name=value

def parse_config(argv, base=None):
    """TrainConfig from a list like ['preset.py', '--max_iters=100']. A preset file holds
    `name = value` lines (Python literals). Unknown keys and wrong types are UserErrors."""
    return TrainConfig(**parse_flags(argv, asdict(base or TrainConfig()), presets=True))


def check_config(cfg):
    """Reject combinations that cannot mean anything, before any work is done."""
    if cfg.freeze_trunk and cfg.init_from == 'scratch':
        raise UserError("freeze_trunk needs a trained trunk: use init_from=<ckpt> or gpt2")
    if cfg.head_warmup_iters and cfg.init_from == 'scratch':
        raise UserError("head_warmup_iters needs a trained trunk: use init_from=<ckpt> or gpt2")
    if cfg.freeze_trunk and (cfg.head_warmup_iters or cfg.trunk_lr_scale != 1.0):
        raise UserError("freeze_trunk never trains the trunk: drop head_warmup_iters / "
                        "trunk_lr_scale")
    if cfg.compile and cfg.memory_efficient:
        raise UserError("memory_efficient runs the heads one by one outside the compiled "
                        "forward: drop compile or memory_efficient")
    for name in ('batch_size', 'block_size', 'grad_accum', 'max_iters', 'eval_interval',
                 'eval_iters', 'log_interval', 'n_future'):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1")
    if cfg.doc_len and not cfg.doc_prompt < cfg.block_size <= cfg.doc_len:
        raise UserError(f"documents need doc_prompt ({cfg.doc_prompt}) < block_size "
                        f"({cfg.block_size}) <= doc_len ({cfg.doc_len})")
    autocast_for(cfg.dtype, 'cpu')  # validates dtype


# -----------------------------------------------------------------------------
# data

class Batches:
    """Random windows of a uint16 token file. The generator state is saved in checkpoints so
    a resumed run draws the same batches as an uninterrupted one.

    Documents (doc_len > 0): the file is a run of documents of doc_len tokens each, and every
    window starts at a document's start. Targets past the document's end and targets that are
    among its first doc_prompt tokens are -1 (no loss, no accuracy): distill.py's documents are a
    prompt of real text followed by the model's own tokens, and only the latter are to be learned.
    (Head i > 1 at the last i - 1 prompt positions still predicts a generated token, with real
    text in between: i - 1 targets per document, about 1% at distill.py's defaults.)"""

    def __init__(self, path, block_size, batch_size, device, seed, doc_len=0, doc_prompt=0):
        if not os.path.isfile(path):
            raise UserError(f"data file not found: {path}; run `python data/prepare.py` first "
                            f"(or --input=FILE for a local text)")
        self.data = np.memmap(path, dtype=np.uint16, mode='r')
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
        if self.doc_len:
            ix = torch.randint(len(self.data) // self.doc_len, (self.batch_size,),
                               generator=self.gen) * self.doc_len
        else:
            ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,),
                               generator=self.gen)
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
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, batches, n_batches, autocast, loss_weights=None, seed=0):
    """Per head: mean CE, top-1 and top-5 accuracy over all positions with a target (token-
    weighted), on n_batches fixed batches (same windows at every evaluation)."""
    model.eval()
    batches.gen.manual_seed(seed)
    n_future = model.config.n_future
    loss_sum = [0.0] * n_future
    count, top1, top5 = [0] * n_future, [0] * n_future, [0] * n_future
    for _ in range(n_batches):
        x, y = batches.next()
        with autocast:
            trunk_hidden = model.trunk(x)
        for i in range(n_future):  # one head at a time: one vocab-sized logits tensor alive
            with autocast:
                scores = model.head_logits(i, trunk_hidden).float()
            t = head_targets(y, i + 1)
            loss_sum[i] += torch.nn.functional.cross_entropy(
                scores.reshape(-1, scores.size(-1)), t.reshape(-1), ignore_index=-1,
                reduction='sum').item()
            n, hits = count_topk(scores, t)
            count[i] += n
            top1[i] += hits[1]
            top5[i] += hits[5]
    model.train()
    heads = [dict(head=i + 1, loss=loss_sum[i] / count[i], top1=top1[i] / count[i],
                  top5=top5[i] / count[i]) for i in range(n_future)]
    weights = loss_weights_for(n_future, loss_weights)
    return dict(loss=heads[0]['loss'], mtp_loss=sum(w * h['loss'] for w, h in zip(weights, heads)),
                heads=heads)


# -----------------------------------------------------------------------------
# the training run

def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters > 0 else cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def build_model(cfg, meta):
    """(model, checkpoint to resume or None). Scratch, resume, or adapt a trained NTP model."""
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if cfg.init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path)
        model = model_from_checkpoint(ckpt)
    elif cfg.init_from == 'scratch':
        ckpt = None
        model = MTPGPT(MTPConfig(block_size=cfg.block_size, vocab_size=meta['vocab_size'],
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                 dropout=cfg.dropout, bias=cfg.bias, n_future=cfg.n_future,
                                 attach_layer=cfg.attach_layer, head_type=cfg.head_type,
                                 whs=cfg.whs))
    else:
        ckpt = None
        source, source_ckpt = load_model(cfg.init_from)
        if source.config.n_future > 1:  # it has heads already: fine-tune it whole (distill.py)
            model = model_from_checkpoint({**source_ckpt, 'model_args': {
                **source_ckpt['model_args'], 'dropout': cfg.dropout}})
        else:
            source.config.dropout = cfg.dropout  # from_gpt builds the new model from this config
            model = MTPGPT.from_gpt(source, cfg.n_future, cfg.attach_layer, cfg.head_type,
                                    cfg.whs)
    if model.config.vocab_size != meta['vocab_size']:
        raise UserError(f"model vocab_size {model.config.vocab_size} does not match the dataset's "
                        f"{meta['vocab_size']}")
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size {cfg.block_size} is larger than the model supports "
                        f"({model.config.block_size})")
    if cfg.block_size <= model.config.n_future:  # (the model's heads, not the flag's)
        raise UserError(f"block_size {cfg.block_size} leaves head {model.config.n_future} no "
                        f"target: use block_size > n_future")
    return model, ckpt


def build_optimizer(model, cfg, device_type):
    """AdamW with three parameter groups: the trunk (LR x trunk_lr_scale: differential LR), the
    heads, and the WHS logits. WHS starts as the last trunk layer, a softmax saturated at logit
    WHS_INIT_LOGIT, where its gradients are ~1e-7 of normal: with the heads' LR and Adam's eps
    (1e-8 > those gradients) the mix would not move within a fine-tuning run (measured: WHS rows
    identical to non-WHS ones). So the logits get LR x whs_lr_scale and a tiny eps: Adam then
    takes steps of about that LR in logit space whatever the gradient's scale."""
    whs = {id(p) for p in model.whs_parameters()}
    groups = {'trunk': (model.trunk_parameters(), cfg.trunk_lr_scale),
              'heads': ([p for p in model.heads.parameters() if id(p) not in whs], 1.0),
              'whs': (model.whs_parameters(), cfg.whs_lr_scale, 1e-20)}
    return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                      (cfg.beta1, cfg.beta2), device_type, groups)


def set_trunk_trainable(model, trainable):
    for p in model.trunk_parameters():
        p.requires_grad_(trainable)


def train(cfg):
    """Run a training job; returns the summary dict (also printed as the last JSON line)."""
    check_config(cfg)
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world = 0, 1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        backend = 'nccl' if torch.cuda.is_available() and cfg.device != 'cpu' else 'gloo'
        dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.grad_accum % world:
            raise UserError(f"grad_accum={cfg.grad_accum} must be divisible by the {world} ranks")
        if cfg.memory_efficient or cfg.head_warmup_iters:
            raise UserError("memory_efficient and head_warmup_iters are not supported with DDP")
    master = rank == 0
    device = pick_device(cfg.device)
    if ddp and backend == 'nccl':
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    device_type = 'cuda' if 'cuda' in device else ('mps' if 'mps' in device else 'cpu')
    autocast = autocast_for(cfg.dtype, device)
    dtype = 'float32' if isinstance(autocast, nullcontext) else 'bfloat16'
    torch.manual_seed(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever stays in fp32
    torch.backends.cudnn.allow_tf32 = True

    data_dir = cfg.data_dir or os.path.join(REPO, 'data', cfg.dataset)
    if not os.path.isfile(os.path.join(data_dir, 'meta.json')):
        raise UserError(f"no prepared data in {data_dir}: run `python data/prepare.py "
                        f"--dataset={cfg.dataset}` (add --input=FILE to use a local text file)")
    meta = load_meta(data_dir)
    micro_steps = cfg.grad_accum // world
    docs = dict(doc_len=cfg.doc_len, doc_prompt=cfg.doc_prompt)
    train_batches = Batches(os.path.join(data_dir, 'train.bin'), cfg.block_size, cfg.batch_size,
                            device, cfg.seed + rank, **docs)
    val_batches = Batches(os.path.join(data_dir, 'val.bin'), cfg.block_size, cfg.batch_size,
                          device, 0, **docs)
    eval_train = Batches(os.path.join(data_dir, 'train.bin'), cfg.block_size, cfg.batch_size,
                         device, 0, **docs)

    model, ckpt = build_model(cfg, meta)
    model.to(device)
    try:
        explicit = [float(w) for w in cfg.loss_weights.split(',')] if cfg.loss_weights else None
    except ValueError:
        raise UserError(f"loss_weights must be comma-separated numbers, got {cfg.loss_weights!r}")
    loss_weights = loss_weights_for(model.config.n_future, explicit, cfg.mtp_weight, cfg.mtp_decay)
    if cfg.freeze_trunk:
        set_trunk_trainable(model, False)
    for head, weight in zip(model.heads, loss_weights):
        if weight == 0:  # untrained: out of the optimizer, and DDP must not wait for its gradient
            head.requires_grad_(False)
    optimizer = build_optimizer(model, cfg, device_type)
    iter_num, best_val = 0, float('inf')
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError):
            raise UserError("the checkpoint's optimizer does not match these flags: resume with "
                            "the strategy flags of the original run (freeze_trunk, "
                            "trunk_lr_scale, whs_lr_scale, ...)")
        iter_num, best_val = ckpt['iter_num'], ckpt['best_val_loss']
        # each rank its own RNG states (exact when resumed with as many ranks as were saved)
        saved = ckpt['rng'].get('ranks', [ckpt['rng']])
        if rank < len(saved):
            torch.set_rng_state(saved[rank]['torch'])
            train_batches.gen.set_state(saved[rank]['batches'])
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if backend == 'nccl' else None)

    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)

    def rng_states():
        """The RNG states (torch, batches) of every rank; every rank must call this."""
        mine = dict(torch=torch.get_rng_state(), batches=train_batches.gen.get_state())
        if not ddp:
            return [mine]
        states = [None] * world
        dist.all_gather_object(states, mine)
        return states

    def save(last_eval, states):
        save_checkpoint(dict(model=raw_model.state_dict(), model_args=asdict(raw_model.config),
                             optimizer=optimizer.state_dict(), iter_num=iter_num,
                             best_val_loss=best_val, config=asdict(cfg), meta=meta,
                             eval=last_eval, rng=dict(**states[0], ranks=states)),
                        ckpt_path)

    def diverged(loss, where):
        raise UserError(f"loss is {loss} at {where}: stopping; the last good checkpoint "
                        f"({ckpt_path}) is intact; try a lower learning_rate")

    log = (lambda s: None) if (cfg.quiet or not master) else tqdm.write
    if master and not cfg.quiet:
        log(f"{raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.config.n_future} heads, "
            f"device {device}, dtype {dtype}, {cfg.batch_size * cfg.block_size * cfg.grad_accum:,} "
            f"tokens/iter")
    losses, step_ms, last_eval = {}, [], None
    t0 = time.time()
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=cfg.quiet or not master,
               dynamic_ncols=True)
    while iter_num < cfg.max_iters:
        t_step = time.time()
        warming_up = iter_num < cfg.head_warmup_iters
        if cfg.head_warmup_iters:
            set_trunk_trainable(model=raw_model, trainable=not warming_up)
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']
        loss_accum = 0.0
        for micro in range(micro_steps):
            x, y = train_batches.next()
            if ddp:
                model.require_backward_grad_sync = micro == micro_steps - 1
            with autocast:
                if cfg.memory_efficient:
                    loss = raw_model.forward_backward_sequential(x, y, loss_weights,
                                                                 1.0 / micro_steps)
                else:
                    _, loss = model(x, y, loss_weights=loss_weights)
            if not torch.isfinite(loss):
                bar.close()
                diverged(loss.item(), f"iter {iter_num}")
            if not cfg.memory_efficient:
                (loss / micro_steps).backward()
            loss_accum += loss.item() / micro_steps
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                           cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        step_ms.append(1000 * (time.time() - t_step))
        losses[iter_num] = loss_accum
        bar.update(1)
        if iter_num % cfg.log_interval == 0:
            bar.set_postfix(objective=f"{loss_accum:.4f}", lr=f"{lr:.2e}")
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            last_eval = dict(iter=iter_num,
                             train=evaluate(raw_model, eval_train, cfg.eval_iters, autocast,
                                            loss_weights),
                             val=evaluate(raw_model, val_batches, cfg.eval_iters, autocast,
                                          loss_weights))
            bad = [last_eval[s]['loss'] for s in ('train', 'val')
                   if not math.isfinite(last_eval[s]['loss'])]
            if bad:  # diverged during the last step: never overwrite the good checkpoint
                bar.close()
                diverged(bad[0], f"the evaluation of iter {iter_num}")
            best_val = min(best_val, last_eval['val']['loss'])
            heads = ' '.join(f"h{h['head']} {h['loss']:.3f}/{h['top1']:.3f}/{h['top5']:.3f}"
                             for h in last_eval['val']['heads'])
            log(f"iter {iter_num}: train loss {last_eval['train']['loss']:.4f}, val loss "
                f"{last_eval['val']['loss']:.4f} | val loss/top1/top5 per head: {heads}")
            states = rng_states()
            if master:
                save(last_eval, states)
    bar.close()
    if ddp:
        dist.destroy_process_group()
    # val_loss / train_loss: head 1's next-token loss (comparable with any GPT);
    # last_objective: the weighted MTP loss of the last step (what was minimized)
    summary = dict(iters=iter_num, last_objective=losses[max(losses)] if losses else None,
                   train_loss=last_eval['train']['loss'] if last_eval else None,
                   val_loss=last_eval['val']['loss'] if last_eval else None,
                   val_heads=last_eval['val']['heads'] if last_eval else None,
                   ms_per_iter=statistics.median(step_ms) if step_ms else None,
                   time_s=time.time() - t0, ckpt=ckpt_path, losses=losses, step_ms=step_ms,
                   model=raw_model)
    return summary


def printable(summary):
    """The JSON-friendly part of train()'s summary (without the model and per-step lists)."""
    return {k: v for k, v in summary.items() if k not in ('losses', 'step_ms', 'model')}


def main(argv):
    cfg = parse_config(argv)
    summary = train(cfg)
    if int(os.environ.get('RANK', 0)) == 0:
        print(json.dumps(printable(summary)))


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
