"""
Train a GPT with multi-token prediction heads (n_future = 1 is plain next-token training).

    python train.py                                   # defaults: MTP from scratch, shakespeare_char
    python train.py config/ntp_shakespeare_char.py --max_iters=500   # a preset, then flags
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (nccl on CUDA, gloo on CPU)

init_from=<checkpoint | gpt2* | EleutherAI/pythia-*> adapts a trained model: training_strategy().
"""
import json
import math
import os
import time
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
from tqdm import tqdm

from heads import MTPGPT, MTPConfig, loss_weights_for, parse_loss_weights
from common import (UserError, SHAPE, MODEL, parse_config, check_ranges, autocast_for, Distributed,
                    save_checkpoint, load_checkpoint, model_from_checkpoint, load_model,
                    device_memory, resumed_config, restore, cli)
from writers import check_out_dir, writing, set_aside
from data.text import data_dir_of, check_data_tokenizer
from data.prepare import load_data
from report import evaluate_splits, diverged, eval_line, summarize, printable


# -----------------------------------------------------------------------------
# the checks: of the flags before any work is done, of the checkpoint a run starts from

def check_config(cfg):
    """Before any work: flags that cannot go together, numbers that would fail deep inside or
    silently (nan), an out_dir that holds the source checkpoint or is not writable."""
    check_ranges(cfg, positive=('batch_size', 'block_size', 'grad_accum', 'max_iters',
                                'eval_interval', 'eval_iters', 'log_interval', 'n_future'),
                 non_negative=('warmup_iters', 'head_warmup_iters'), fractions=('schedule_frac',))
    ranks = int(os.environ.get('WORLD_SIZE', 1)) if 'RANK' in os.environ else 0  # torchrun's
    for wrong, error in (  # flags that cannot go together
            (cfg.init_from == 'scratch' and (cfg.freeze_trunk or cfg.head_warmup_iters),
             "freeze_trunk and head_warmup_iters need a trained trunk: use init_from=<ckpt>"),
            (cfg.freeze_trunk and (cfg.head_warmup_iters or cfg.trunk_lr_scale != 1.0),
             "freeze_trunk never trains the trunk: drop head_warmup_iters / trunk_lr_scale"),
            (cfg.compile and cfg.memory_efficient, "memory_efficient runs the heads one by one "
             "outside the compiled forward: drop compile or memory_efficient"),
            ('head_attention' in cfg.given and cfg.head_attention and
             cfg.head_type != 'sequential', f"head_attention gives sequential heads a "
             f"transformer block; {cfg.head_type} heads have theirs: drop --head_attention"),
            (ranks and cfg.grad_accum % ranks,
             f"grad_accum={cfg.grad_accum} must be divisible by the {ranks} ranks"),
            (ranks and (cfg.memory_efficient or cfg.head_warmup_iters or cfg.loss_schedule !=
                        'constant'), "memory_efficient, head_warmup_iters and loss_schedule are "
             "not supported with DDP"),
            (cfg.loss_schedule not in ('constant', 'curriculum', 'shrink'), f"loss_schedule "
             f"must be constant, curriculum or shrink, not {cfg.loss_schedule!r}"),
            (cfg.doc_len and not cfg.doc_prompt < cfg.block_size <= cfg.doc_len,
             f"documents need doc_prompt ({cfg.doc_prompt}) < block_size ({cfg.block_size}) "
             f"<= doc_len ({cfg.doc_len})")):
        if wrong:
            raise UserError(error)
    autocast_for(cfg.dtype, 'cpu')  # validates dtype
    for rule, ok, names in (('> 0', lambda v: v > 0, ('learning_rate',)),
                            ('in [0, 1)', lambda v: 0 <= v < 1, ('beta1', 'beta2', 'dropout')),
                            ('>= 0', lambda v: v >= 0, ('min_lr', 'weight_decay', 'grad_clip',
                                                        'trunk_lr_scale', 'mtp_weight',
                                                        'mtp_decay'))):
        for name in names:  # (nan fails every comparison)
            if not (math.isfinite(getattr(cfg, name)) and ok(getattr(cfg, name))):
                raise UserError(f"{name} must be a number {rule}, got {getattr(cfg, name)}")
    if cfg.min_lr > cfg.learning_rate and cfg.init_from != 'resume':  # (a resume continues)
        raise UserError(f"min_lr {cfg.min_lr} is above learning_rate {cfg.learning_rate}: the "
                        f"cosine schedule would raise the LR; give a lower --min_lr")
    if not all(map(math.isfinite, parse_loss_weights(cfg.loss_weights) or [])):
        raise UserError(f"loss_weights must be finite numbers, got {cfg.loss_weights!r}")
    if cfg.init_from == 'scratch':  # (otherwise the checkpoint's shape decides)
        check_ranges(cfg, positive=('n_layer', 'n_head', 'n_embd'))
        if cfg.n_embd % cfg.n_head:
            raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    target = os.path.realpath(os.path.join(cfg.out_dir, 'ckpt.pt'))
    if cfg.init_from != 'resume' and os.path.realpath(cfg.init_from) == target:
        raise UserError(f"out_dir {cfg.out_dir} holds the source checkpoint {cfg.init_from}: "
                        f"training would overwrite it; pick another --out_dir")
    check_out_dir(cfg.out_dir)


def check_resume(ckpt, cfg, meta):
    """A resume continues the checkpoint's run: its resume state, its tokenizer (another data dir
    of it: allowed), its model (a shape flag given another value: an error), iterations left."""
    missing = [k for k in ('optimizer', 'iter_num', 'best_val_loss', 'rng') if k not in ckpt]
    if missing:
        raise UserError(f"the checkpoint in {cfg.out_dir} has no {', '.join(missing)}: it cannot "
                        f"be resumed; start from it with --init_from=PATH and another --out_dir")
    check_data_tokenizer(ckpt, meta, data_dir_of(cfg.dataset, cfg.data_dir))
    args = ckpt['model_args']
    given = {k: getattr(cfg, k) for k in MODEL + ('dropout',) if k in cfg.given}
    try:
        wanted = asdict(MTPConfig(**{**args, **given}))  # (attach_layer -1 resolved)
    except UserError:  # (a shape its heads cannot take: the loop names the shape flag)
        wanted = {**args, **given}
    for key in (k for k in given if wanted[k] != args[k]):
        raise UserError(f"--{key}={given[key]} differs from the checkpoint's {key}={args[key]}: "
                        f"a resumed run keeps its model; pass the original value")
    if ckpt['iter_num'] >= cfg.max_iters:
        raise UserError(f"nothing to do: the checkpoint is at iteration {ckpt['iter_num']} and "
                        f"max_iters is {cfg.max_iters}; raise --max_iters to train on")


# -----------------------------------------------------------------------------
# the model and the paper's training strategies

def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters > 0 else cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def check_fits(cfg, c, device):
    """Before the model of MTPConfig c is built (and once built): block_size leaves every head a
    target within the model's positions, and the run fits the device's memory: at least 16 bytes
    a parameter (weights, gradients, AdamW's moments), 34 per token, channel and layer (Korthikanti
    et al. 2022), 8 per token and vocabulary entry of each head (memory_efficient: one head)."""
    if cfg.block_size <= c.n_future:
        raise UserError(f"block_size {cfg.block_size} leaves head {c.n_future} no target")
    if cfg.block_size > c.block_size:
        raise UserError(f"--block_size={cfg.block_size} > the model's {c.block_size}: lower it")
    C, tokens, heads = c.n_embd, cfg.batch_size * cfg.block_size, c.n_future
    params = (12 * c.n_layer + 8 * (heads - 1)) * C ** 2 + (c.vocab_size + c.block_size) * C
    need = 16 * params + tokens * (34 * C * c.n_layer + 8 * c.vocab_size * (
        1 if cfg.memory_efficient else heads))
    if need > device_memory(device):
        raise UserError(f"this run needs about {need / 2 ** 30:,.0f} GiB ({params / 1e6:,.0f}M "
                        f"parameters, {tokens:,} tokens a micro-batch), more than the {device}'s "
                        f"{device_memory(device) / 2 ** 30:.0f} GiB: shrink the model or the batch")


def build_model(cfg, meta, ckpt=None, device='cpu'):
    """The model: scratch, resume (ckpt) or adapt a trained model, checked to fit (check_fits).
    Afterwards cfg holds the model's values (the saved config records what the run used)."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
        check_resume(ckpt, cfg, meta)  # its tokenizer, shape, resume state, iterations left
    elif cfg.init_from == 'scratch':  # the model: the flags named like MTPConfig's fields
        config = MTPConfig(vocab_size=meta['vocab_size'], **{
            f.name: getattr(cfg, f.name) for f in fields(MTPConfig) if hasattr(cfg, f.name)})
        check_fits(cfg, config, device)
        model = MTPGPT(config)
    else:
        source, source_ckpt = load_model(cfg.init_from)
        check_data_tokenizer(source_ckpt, meta, data_dir_of(cfg.dataset, cfg.data_dir))
        adapt_flags(cfg, source.config)
        same_heads = cfg.head_type == source.config.head_type and (
            cfg.head_type != 'sequential' or cfg.head_attention == source.config.head_attention)
        if source.config.n_future > 1 and same_heads:
            # it has heads of this type already: fine-tune it whole (distill.py); with another
            # --head_type, its next-token path gets new heads (from_gpt) like any NTP model
            model = model_from_checkpoint({**source_ckpt, 'model_args': {
                **source_ckpt['model_args'], 'dropout': cfg.dropout}})
        else:
            check_fits(cfg, MTPConfig(**{**asdict(source.config), **{  # (from_gpt's model)
                k: getattr(cfg, k) for k in MODEL[len(SHAPE):]}}), device)
            source.config.dropout = cfg.dropout  # from_gpt builds the new model from this config
            model = MTPGPT.from_gpt(source, cfg.n_future, cfg.attach_layer, cfg.head_type, cfg.whs,
                                    cfg.head_attention)
    # (a Hugging Face model's embedding may be padded past its tokenizer: Pythia has 50304 rows)
    padded = meta.get('kind') == 'hf' and model.config.vocab_size > meta['vocab_size']
    if model.config.vocab_size != meta['vocab_size'] and not padded:
        raise UserError(f"model vocab_size {model.config.vocab_size} does not match the dataset's "
                        f"{meta['vocab_size']}")
    check_fits(cfg, model.config, device)  # (the model's heads and positions, not the flags')
    for name in MODEL:
        setattr(cfg, name, getattr(model.config, name))
    return model


def adapt_flags(cfg, source):
    """Adapting a trained model: its shape is the source's (a shape flag given another value is
    an error); an MTP source keeps its heads unless --head_type is given."""
    for name in (n for n in SHAPE if n in cfg.given and getattr(cfg, n) != getattr(source, n)):
        raise UserError(f"--{name}={getattr(cfg, name)}: the model adapted from {cfg.init_from} "
                        f"has its {name}={getattr(source, name)}; drop the flag")
    if source.n_future > 1 and 'head_type' not in cfg.given:  # its heads, fine-tuned whole
        for name in MODEL[len(SHAPE):]:
            if name in cfg.given and getattr(cfg, name) != getattr(source, name):
                raise UserError(f"--{name}={getattr(cfg, name)}: {cfg.init_from} is fine-tuned "
                                f"with its own heads ({name}={getattr(source, name)}); drop the "
                                f"flag, or give --head_type for new heads on its next-token path")
            setattr(cfg, name, getattr(source, name))


Strategy = namedtuple('Strategy', 'loss_weights optimizer trunk_trainable')


def training_strategy(model, cfg, device_type):
    """The paper's training strategies (Mehra et al. 2025), all of them here:

    loss weights       L = sum_k lambda_k CE_k (--loss_weights, or --mtp_weight, --mtp_decay),
                       over training as --loss_schedule says (scheduled_weights)
    zero-weight heads  frozen: out of the loss and the optimizer (distill.py: lambda_1 = 0)
    frozen trunk       --freeze_trunk: only the heads learn ("MTP heads on a frozen NTP model")
    differential LR    the trunk's LR = trunk_lr_scale x the heads': new heads move fast, the
                       trunk keeps its NTP skills
    WHS                each head's mix of h_0..h_attach (whs_coef): head parameters, no decay
    head warmup        heads only for head_warmup_iters iterations: trunk_trainable(it), each step
    """
    loss_weights = loss_weights_for(model.config.n_future, parse_loss_weights(cfg.loss_weights),
                                    cfg.mtp_weight, cfg.mtp_decay)
    if cfg.loss_schedule != 'constant' and loss_weights[0] == 0:
        raise UserError("a loss schedule ramps heads 2..n in or out: lambda_1 = 0 leaves no weight")
    for k, weight in enumerate(loss_weights, start=1):
        if weight == 0:  # untrained: out of the optimizer, and DDP must not wait for its gradient
            for p in model.heads.head_parameters(k):
                p.requires_grad_(False)
    # a frozen trunk is out of the optimizer; head warmup's is in it, without gradients till then
    model.set_trunk_trainable(not cfg.freeze_trunk)
    groups = [dict(name='trunk', params=model.trunk_parameters(), lr_scale=cfg.trunk_lr_scale),
              dict(name='heads', params=list(model.heads.parameters()), lr_scale=1.0)]
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device_type, groups)

    def trunk_trainable(it):
        return not cfg.freeze_trunk and it >= cfg.head_warmup_iters
    return Strategy(loss_weights, optimizer, trunk_trainable)


def scheduled_weights(weights, it, cfg):
    """The loss weights at iteration it: lambda_k x clamp(h - k + 1, 0, 1), for a horizon h that
    --loss_schedule moves between 1 (NTP) and n (every head), over the iterations of the LR
    schedule (lr_decay_iters, or max_iters: so a resume continues it); f = --schedule_frac:
        constant    h = n: the weights as given (--mtp_decay=0.5: the geometric 1, 1/2, 1/4)
        curriculum  h = 1 for the first f of training, then grows to n by 2f: NTP first, the
                    heads ramped in one after another (a forward curriculum)
        shrink      h = n until the last f of training, then shrinks to 1: the farthest head
                    ramps out first (the shrinking horizon of modded-nanogpt's speedrun)"""
    span = cfg.lr_decay_iters if cfg.lr_decay_iters > 0 else cfg.max_iters
    n, t, f = len(weights), min(1, it / span), cfg.schedule_frac
    h = {'constant': n, 'curriculum': 1 + (n - 1) * min(1, max(0, t / f - 1)),
         'shrink': 1 + (n - 1) * min(1, (1 - t) / f)}[cfg.loss_schedule]
    return [w * min(1, max(0, h - k)) for k, w in enumerate(weights)]  # (k from 0 here)


# -----------------------------------------------------------------------------
# the training run: a step, the loop

def train_step(model, raw_model, batches, loss_weights, cfg, autocast, micro_steps, where):
    """One optimizer step over micro_steps micro-batches (gradient accumulation); the loss."""
    loss_accum = 0.0
    for micro in range(micro_steps):
        x, y = batches.next()
        if hasattr(model, 'require_backward_grad_sync'):  # DDP: sync at the last micro-batch
            model.require_backward_grad_sync = micro == micro_steps - 1
        with autocast:
            if cfg.memory_efficient:  # heads' forward + backward one at a time
                loss = raw_model.backward_head_by_head(x, y, loss_weights, 1 / micro_steps)
            else:  # (a schedule's heads after the last weighted one are not computed)
                n = len(loss_weights) if cfg.loss_schedule == 'constant' else max(
                    k for k, w in enumerate(loss_weights, start=1) if w)
                _, loss = model(x, y, loss_weights=loss_weights[:n], n_heads=n)
        if not torch.isfinite(loss):
            raise diverged(loss.item(), where, os.path.join(cfg.out_dir, 'ckpt.pt'))
        if not cfg.memory_efficient:
            (loss / micro_steps).backward()
        loss_accum += loss.item() / micro_steps
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                       cfg.grad_clip)
    return loss_accum


def train(cfg):
    """Run a training job; returns the summary dict (also printed as the last JSON line)."""
    ckpt, ckpt_path = None, os.path.join(cfg.out_dir, 'ckpt.pt')
    if cfg.init_from == 'resume':  # the run's own flags first: they decide data and batches
        ckpt = load_checkpoint(ckpt_path)
        cfg = resumed_config(cfg, ckpt)
    check_config(cfg)
    dist = Distributed(cfg.device)
    autocast = autocast_for(cfg.dtype, dist.device)
    torch.manual_seed(cfg.seed + dist.rank)
    meta, train_batches, val_batches, eval_train = load_data(cfg, dist.device, dist.rank)
    raw_model = build_model(cfg, meta, ckpt, dist.device)
    raw_model.to(dist.device)
    strategy = training_strategy(raw_model, cfg, dist.device.split(':')[0])
    iter_num, best_val = (0, float('inf')) if ckpt is None else restore(
        ckpt, strategy.optimizer, train_batches, dist.rank)
    model = dist.wrap(torch.compile(raw_model) if cfg.compile else raw_model)
    log = (lambda s: None) if (cfg.quiet or not dist.master) else tqdm.write
    dtype = 'float32' if isinstance(autocast, nullcontext) else 'bfloat16'
    log(f"{raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.config.n_future} heads, "
        f"{dist.device}, {dtype}, {cfg.batch_size * cfg.block_size * cfg.grad_accum:,} tokens/iter")
    losses, step_ms, evals, t0 = {}, [], [], time.time()
    with tqdm(total=cfg.max_iters, initial=iter_num, disable=cfg.quiet or not dist.master,
              dynamic_ncols=True) as bar:
        while iter_num < cfg.max_iters:
            t_step = time.time()
            if cfg.head_warmup_iters:  # (otherwise trunk_trainable never changes)
                raw_model.set_trunk_trainable(strategy.trunk_trainable(iter_num))
            lr = get_lr(iter_num, cfg)
            for group in strategy.optimizer.param_groups:
                group['lr'] = lr * group['lr_scale']
            weights = scheduled_weights(strategy.loss_weights, iter_num, cfg)
            losses[iter_num + 1] = train_step(model, raw_model, train_batches, weights, cfg,
                                              autocast, cfg.grad_accum // dist.world,
                                              f"iter {iter_num}")
            strategy.optimizer.step()
            strategy.optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            step_ms.append(1000 * (time.time() - t_step))
            bar.update(1)
            if iter_num % cfg.log_interval == 0:
                bar.set_postfix(objective=f"{losses[iter_num]:.4f}", lr=f"{lr:.2e}")
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                evals.append(evaluate_splits(raw_model, eval_train, val_batches, cfg, autocast,
                                             weights, iter_num))
                best_val = min(best_val, evals[-1]['val']['loss'])
                log(eval_line(evals[-1]))
                states = dist.gather(dict(torch=torch.get_rng_state(),
                                          batches=train_batches.gen.get_state()))
                if dist.master:  # everything a resume needs, every rank's RNG states included
                    if ckpt is None and len(evals) == 1:  # first save: a run stopped before
                        set_aside(ckpt_path, tqdm.write)  # leaves the old one where it was
                    save_checkpoint(dict(
                        model=raw_model.state_dict(), model_args=asdict(raw_model.config),
                        optimizer=strategy.optimizer.state_dict(), iter_num=iter_num,
                        best_val_loss=best_val, config=asdict(cfg), meta=meta, eval=evals[-1],
                        rng=dict(**states[0], ranks=states)), ckpt_path)
    dist.close()
    return summarize(iter_num, losses, evals, step_ms, time.time() - t0, ckpt_path, raw_model)


def main(argv):
    cfg, rank = parse_config(argv), int(os.environ.get('RANK', 0))
    with writing(cfg.out_dir, 'out_dir') if rank == 0 else nullcontext():  # (rank 0 writes)
        summary = train(cfg)
    if rank == 0:
        print(json.dumps(printable(summary)))


if __name__ == '__main__':
    cli(main)
