"""
What a training run (train.py, distill.py) measures and reports: every head's loss and top-1 /
top-5 accuracy on fixed batches, the divergence stop, the line logged at each evaluation and the
run's summary. Imports: heads, common, metrics <- report <- train, distill, study.
"""
import math
import os
import statistics

import torch
from torch.nn import functional as F

from heads import loss_weights_for, head_targets
from common import UserError
from metrics import count_topk


@torch.no_grad()
def evaluate(model, batches, n_batches, autocast, loss_weights=None, seed=0):
    """Per head: mean CE, top-1 and top-5 accuracy over all positions with a target (token-
    weighted), on n_batches fixed batches (same windows at every evaluation)."""
    model.eval()
    batches.gen.manual_seed(seed)
    sums = [dict(loss=0.0, n=0, top1=0, top5=0) for _ in range(model.config.n_future)]
    for _ in range(n_batches):
        x, y = batches.next()
        with autocast:  # the heads one at a time: one logits tensor alive
            for (k, state), s in zip(model.head_states(x, model.trunk(x)), sums):
                scores = model.unembed(state).float()
                targets = head_targets(y, k)
                s['loss'] += F.cross_entropy(scores.flatten(0, -2), targets.flatten(),
                                             ignore_index=-1, reduction='sum').item()
                n, hits = count_topk(scores, targets)
                s.update(n=s['n'] + n, top1=s['top1'] + hits[1], top5=s['top5'] + hits[5])
    model.train()
    heads = [dict(head=k, **{m: s[m] / s['n'] for m in ('loss', 'top1', 'top5')})
             for k, s in enumerate(sums, start=1)]
    weights = loss_weights_for(len(heads), loss_weights)
    return dict(loss=heads[0]['loss'], mtp_loss=sum(w * h['loss'] for w, h in zip(weights, heads)),
                heads=heads)


def evaluate_splits(model, eval_train, val_batches, cfg, autocast, loss_weights, iter_num):
    """Train and val metrics per head, and the WHS mix (MTPGPT.whs_weights); a non-finite loss
    stops the run before any save."""
    result, whs = dict(iter=iter_num), model.whs_weights()
    for split, batches in (('train', eval_train), ('val', val_batches)):
        result[split] = evaluate(model, batches, cfg.eval_iters, autocast, loss_weights)
        if not math.isfinite(result[split]['loss']):
            raise diverged(result[split]['loss'], f"the evaluation of iter {iter_num}",
                           os.path.join(cfg.out_dir, 'ckpt.pt'))
    return dict(result, whs=None if whs is None else whs.tolist())


def diverged(loss, where, ckpt_path):
    kept = f"the last good checkpoint ({ckpt_path}) is intact" if os.path.isfile(ckpt_path) else \
        "no checkpoint was written"
    return UserError(f"loss is {loss} at {where}: stopping; {kept}; try a lower learning_rate")


def eval_line(last_eval):
    heads = ' '.join(f"h{h['head']} {h['loss']:.3f}/{h['top1']:.3f}/{h['top5']:.3f}"
                     for h in last_eval['val']['heads'])
    whs = ' | WHS mix h_0..h_attach per head: ' + '; '.join(
        ' '.join(f"{c:.2f}" for c in row) for row in last_eval['whs']) if last_eval['whs'] else ''
    return (f"iter {last_eval['iter']}: train loss {last_eval['train']['loss']:.4f}, val loss "
            f"{last_eval['val']['loss']:.4f} | val loss/top1/top5 per head: {heads}{whs}")


def summarize(iter_num, losses, evals, step_ms, seconds, ckpt_path, model):
    """val_loss / train_loss: head 1's next-token loss (comparable with any GPT) at the last
    evaluation; last_objective: the weighted MTP loss of the last step (what was minimized);
    evals: every evaluation of this session (evaluate_splits)."""
    last = evals[-1] if evals else None
    evaluated = lambda split, key: last[split][key] if last else None  # noqa: E731
    return dict(iters=iter_num, last_objective=losses[max(losses)] if losses else None,
                train_loss=evaluated('train', 'loss'), val_loss=evaluated('val', 'loss'),
                val_heads=evaluated('val', 'heads'), whs=last['whs'] if last else None,
                ms_per_iter=statistics.median(step_ms) if step_ms else None, evals=evals,
                time_s=seconds, ckpt=ckpt_path, losses=losses, step_ms=step_ms, model=model)


def printable(summary):
    """The JSON-friendly part of train()'s summary (without the model and per-step lists)."""
    return {k: v for k, v in summary.items() if k not in ('losses', 'step_ms', 'model')}
