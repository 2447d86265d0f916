"""
Layer probes: where in a next-token model does the token after next live? MTP heads on a frozen
next-token (NTP) model do poorly as its hidden layers specialize for NTP (Mehra et al. 2025).
This measures it: for every layer l = 0..L of an NTP model (h_0 = the embeddings, h_L = the last
block's output), how well does h_l at position t predict x_{t+1}, and x_{t+2}?

  logit lens    unembed(ln_f(h_l)): the model's own readout on an inner layer (nostalgebraist
                2020); nothing is trained. At l = L it is the model's next-token prediction.
  linear probe  W_l LayerNorm(h_l) + b_l, fit by cross-entropy on train positions with the
                model frozen (Alain & Bengio 2016): what a linear head can read from h_l.

If the claim holds, x_{t+1} is read best at the last layer, x_{t+2} at a layer below it.

    python probes.py --ckpt=out-ntp/ckpt.pt        # a table per readout, then a JSON line
"""
import json
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from model import run_blocks
from common import UserError, flag, parse_flags, check_ranges, pick_device, load_model, cli
from data.text import data_dir_of, tokens_for
from metrics import eval_windows, window_batch, count_topk

K_AHEAD = 2  # x_{t+1} and x_{t+2}


@torch.no_grad()
def layer_states(model, tokens, positions, seed=0):
    """Every layer's hidden state at up to `positions` positions of a token array, and their
    targets: (states (L+1, N, C), targets (N, 2) holding x_{t+1}, x_{t+2})."""
    device = next(model.parameters()).device
    blocks = model.ntp_blocks()  # trunk + head 1: the next-token path, L blocks
    states, targets = [], []
    for start, n in eval_windows(len(tokens), model.config.block_size, K_AHEAD, positions, seed):
        seq, target = window_batch(tokens, start, n, K_AHEAD, device)
        hidden = run_blocks(model.embed(seq[None]), blocks)  # [h_0, .., h_L], each (1, T, C)
        states.append(torch.stack([h[0, :n] for h in hidden]))
        targets.append(target)
    return torch.cat(states, dim=1), torch.cat(targets)


def fit_probes(states, targets, vocab_size, steps=500, lr=1e-2, batch_size=512, seed=0):
    """One linear probe per (layer, k) for x_{t+k}, all trained together in one batched matmul:
    W (2, L+1, C, V), b (2, L+1, 1, V)."""
    n_layers, N, C = states.shape
    gen = torch.Generator().manual_seed(seed)
    W = torch.zeros(K_AHEAD, n_layers, C, vocab_size, device=states.device, requires_grad=True)
    b = torch.zeros(K_AHEAD, n_layers, 1, vocab_size, device=states.device, requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=lr)
    for _ in range(steps):
        rows = torch.randint(N, (batch_size,), generator=gen).to(states.device)
        logits = probe_logits(W, b, states[:, rows])                # (2, L+1, B, V)
        target = targets[rows].T[:, None, :].expand(-1, n_layers, -1)  # (2, L+1, B)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), target.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return W.detach(), b.detach()


def probe_logits(W, b, states):
    """(2, L+1, N, V) logits of every probe on states (L+1, N, C)."""
    return F.layer_norm(states, states.shape[-1:])[None] @ W + b


def accuracy(logits, targets):
    """{'top1': [[per layer] for k = 1, 2], 'top5': ...} of logits (2, L+1, N, V)."""
    hits = [[count_topk(layer, targets[:, k]) for layer in logits[k]] for k in range(K_AHEAD)]
    return {f'top{j}': [[h[j] / n for n, h in per_k] for per_k in hits] for j in (1, 5)}


def layer_probes(model, train_tokens, val_tokens, train_positions=8192, val_positions=2048,
                 steps=500, lr=1e-2, seed=0):
    """dict(layers, positions, lens, probe): the val accuracy of x_{t+1}, x_{t+2} from every
    layer by the logit lens and by probes fit on train positions, as accuracy() gives it."""
    model.eval()
    train_states, train_targets = layer_states(model, train_tokens, train_positions, seed)
    val_states, val_targets = layer_states(model, val_tokens, val_positions, seed)
    W, b = fit_probes(train_states, train_targets, model.config.vocab_size, steps, lr, seed=seed)
    with torch.no_grad():
        probe = accuracy(probe_logits(W, b, val_states), val_targets)
        lens = torch.stack([model.unembed(h) for h in val_states])  # the same for k = 1 and 2
        lens = accuracy(torch.stack([lens, lens]), val_targets)
    return dict(layers=list(range(len(val_states))), positions=len(val_targets), lens=lens,
                probe=probe)


@dataclass
class ProbeConfig:
    """python probes.py --ckpt=out-ntp/ckpt.pt [--name=value ...]
Logit lens and linear probes of every layer of a next-token model, for x_{t+1} and x_{t+2}."""
    ckpt: str = flag('out-ntp/ckpt.pt', "a next-token (n_future=1) checkpoint")
    data_dir: str = flag('', "its train.bin / val.bin (default: the checkpoint's dataset)")
    train_positions: int = flag(8192, "positions the probes are fit on")
    val_positions: int = flag(2048, "positions they are scored on")
    steps: int = flag(500, "Adam steps of the probes")
    lr: float = flag(1e-2, "the probes' learning rate")
    seed: int = flag(0, "which windows, which minibatches")
    device: str = flag('auto', "auto (cuda > mps > cpu) | cpu | cuda | mps")


def main(argv):
    args = parse_flags(argv, ProbeConfig())
    check_ranges(args, positive=('train_positions', 'val_positions', 'steps'))
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a number > 0, got {args.lr}")
    model, ckpt = load_model(args.ckpt, pick_device(args.device))
    if model.heads.head1_blocks() is None:
        raise UserError("probes.py reads every block of the next-token path, but this "
                        "checkpoint's head 1 is a WHS or ResBlock head: probe an NTP checkpoint")
    config = ckpt.get('config') or {}
    data_dir = args.data_dir or config.get('data_dir') or (
        data_dir_of(config['dataset']) if config.get('dataset') else '')
    if not data_dir:
        raise UserError("the checkpoint names no dataset: pass --data_dir=DIR")
    tokens = [tokens_for(ckpt, f"{data_dir}/{split}.bin", "pass --data_dir=DIR")
              for split in ('train', 'val')]
    result = layer_probes(model, *tokens, args.train_positions, args.val_positions, args.steps,
                          args.lr, args.seed)
    for readout in ('lens', 'probe'):
        print(f"{readout:5}  {'layer':>5}  {'t+1 top-1':>9} {'top-5':>6}  {'t+2 top-1':>9} "
              f"{'top-5':>6}")
        for layer in result['layers']:
            top1_1, top5_1, top1_2, top5_2 = (result[readout][m][k][layer]
                                              for k in range(K_AHEAD) for m in ('top1', 'top5'))
            print(f"{'':5}  {layer:5d}  {top1_1:9.3f} {top5_1:6.3f}  {top1_2:9.3f} {top5_2:6.3f}")
    print(json.dumps(dict(ckpt=args.ckpt, data_dir=data_dir, **result)))
    return result


if __name__ == '__main__':
    cli(main)
