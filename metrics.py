"""
Accuracy bookkeeping (token-weighted top-k counts, Tally, the accuracy table), the windows of a
token file that an evaluation reads, and what a marginalization costs (tree_cost; check_cost,
the guard that refuses too costly a table before any work). Imports: common, data.text, heads,
drafters <- metrics <- scripts.
"""
import numpy as np
import torch

from common import UserError, check_ranges, pick_device, load_model, clock
from data.text import load_tokens
from heads import next_token_logits
from drafters import head_scores


# -----------------------------------------------------------------------------
# accuracy bookkeeping (token-weighted: every position with a target counts once)

def count_topk(scores, targets, ks=(1, 5)):
    """For scores (..., V) and targets (...) with -1 = no target: (number of targets,
    {k: number of targets among the k highest scores}), to sum over batches."""
    valid = targets >= 0
    n = int(valid.sum())
    top = scores.topk(min(max(ks), scores.size(-1)), dim=-1).indices
    hit = top == targets.clamp(min=0).unsqueeze(-1)
    return n, {k: int((hit[..., :k].any(-1) & valid).sum()) for k in ks}


class Tally:
    """Token-weighted top-1/top-5 accuracy for k = 1..k_ahead and the mean captured mass."""

    def __init__(self, k_ahead):
        self.n, self.top1, self.top5 = [0] * k_ahead, [0] * k_ahead, [0] * k_ahead
        self.mass = None

    def add(self, scores, targets, mass=None):
        """scores (P, K, V) for k = 1..K (K <= k_ahead), targets (P, k_ahead), mass (P, K)."""
        for k in range(scores.size(1)):
            n, hits = count_topk(scores[:, k], targets[:, k])
            self.n[k] += n
            self.top1[k] += hits[1]
            self.top5[k] += hits[5]
        if mass is not None:
            self.mass = [0.0] * len(self.n) if self.mass is None else self.mass
            for k in range(mass.size(1)):
                self.mass[k] += float(mass[:, k].sum())

    def result(self):
        def mean(sums):
            return None if sums is None else [s / n if n else None for s, n in zip(sums, self.n)]
        return dict(n=self.n, top1=mean(self.top1), top5=mean(self.top5), mass=mean(self.mass))


def format_table(rows, k_ahead):
    """The rows as a text table: accuracy and captured mass per k, then the cost."""
    def cells(values, ks):
        return ' '.join('     -' if values is None or values[k] is None else f"{values[k]:6.3f}"
                        for k in ks)
    ks, later = range(k_ahead), range(1, k_ahead)  # the mass is 1 at k = 1: left out
    width = max(len(r['name']) for r in rows)
    group, mass_group = 7 * k_ahead - 1, max(7 * (k_ahead - 1) - 1, 4)
    k_labels, mass_labels = (' '.join(f"{f'k={k + 1}':>6}" for k in r) for r in (ks, later))
    lines = [f"{'':{width}}  {'top-1':^{group}}  {'top-5':^{group}}  {'mass':^{mass_group}}",
             f"{'method':{width}}  {k_labels}  {k_labels}  {mass_labels:>{mass_group}}  "
             f"{'fwd tokens':>11} {'seconds':>8}"]
    lines += [f"{r['name']:{width}}  {cells(r['top1'], ks)}  {cells(r['top5'], ks)}  "
              f"{cells(r['mass'], later):>{mass_group}}  {r['forward_tokens']:>11,} "
              f"{r['seconds']:>8.2f}" for r in rows]
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# what a marginalization evaluates (marginalize.py, bench.py; probes.py's windows)

def marginalize_inputs(args, single_top_k=False):
    """Check MarginalizeFlags; (top_ks: --top_k=1,5,all -> [1, 5, 0] (0 = all of V), '' -> None
    (the default rows); the model in fp32 (the sums are about exactness); the tokens; where they
    came from)."""
    check_ranges(args, positive=('positions', 'chunk_size', 'k_ahead'),
                 non_negative=('max_paths', 'window'), fractions=('top_p',))
    top_ks = []
    for item in filter(None, args.top_k.split(',')):
        if item not in ('all', '0') and not (item.isdigit() and int(item) > 0):
            raise UserError(f"--top_k takes positive integers or 'all', got {item!r}")
        top_ks.append(0 if item == 'all' else int(item))
    if single_top_k and len(top_ks) != 1:
        raise UserError(f"bench.py marginalize takes a single --top_k, got {args.top_k!r}")
    model, ckpt = load_model(args.ckpt, pick_device(args.device))
    tokens, source = load_tokens(ckpt, model.config.vocab_size, args.input, args.data_dir)
    return top_ks or None, model.float(), tokens, source


def check_positions(model, n_tokens, positions, k_ahead, top_p=1.0):
    block_size, positions = model.config.block_size, torch.as_tensor(positions)
    for ok, error in ((0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
                      (k_ahead >= 1, f"k_ahead must be >= 1, got {k_ahead}"),
                      (1 <= n_tokens <= block_size,
                       f"a sequence of {n_tokens} tokens does not fit block_size {block_size}"),
                      (len(positions) > 0, "no positions to evaluate")):
        if not ok:
            raise UserError(error)
    first, last = int(positions.min()), int(positions.max())
    if first < 0 or last >= n_tokens:
        raise UserError(f"positions must lie in 0..{n_tokens - 1}, got {first}..{last}")
    if last + k_ahead - 1 >= block_size:
        # the path tokens of position t sit at positions t+1 .. t+k_ahead-1: never wrap them
        raise UserError(f"position {last} with k_ahead={k_ahead} needs position ids up to "
                        f"{last + k_ahead - 1}, beyond block_size {block_size}")


def eval_windows(n_tokens, window, k_ahead, positions, seed=0):
    """[(start, n)]: the windows tokens[start : start+n+k_ahead], whose positions 0..n-1 have
    their targets x_{t+1}..x_{t+k_ahead} inside (never wrapped). They tile the tokens (no
    position twice); a seeded shuffle picks them until `positions` positions are reached."""
    stride = window - k_ahead  # positions per window
    if stride < 1 or n_tokens <= k_ahead:
        raise UserError(f"need more than k_ahead={k_ahead} tokens per window (window {window}, "
                        f"{n_tokens} tokens)")
    starts = list(range(0, n_tokens - k_ahead, stride))
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, left = [], positions
    for i in order:
        if left <= 0:
            break
        n = min(stride, n_tokens - k_ahead - starts[i], left)
        chosen.append((starts[i], n))
        left -= n
    return chosen


def window_batch(tokens, start, n, k_ahead, device):
    """The window's tokens and the targets (n, k_ahead): column k-1 holds x_{t+k}."""
    seq = torch.as_tensor(np.asarray(tokens[start:start + n + k_ahead], dtype=np.int64),
                          device=device)
    targets = torch.stack([seq[k:k + n] for k in range(1, k_ahead + 1)], dim=1)
    return seq, targets


# -----------------------------------------------------------------------------
# what a marginalization costs, and the guard that refuses too costly a table

def row_name(top_k, top_p, max_paths):
    # top_k = 1 ranks x_{t+k} exactly like greedy chaining: its estimate is p(argmax path) *
    # p(x_{t+k} | argmax path), a constant times the greedy chain's distribution
    name = {0: 'all V', 1: 'greedy (top_k=1)'}.get(top_k, f"top_k={top_k}")
    name += f" top_p={top_p:g}" if top_p < 1 else ''
    name += f" max_paths={max_paths}" if max_paths else ''
    return name + (' (exact)' if name == 'all V' else '')


def tree_cost(n, k_ahead, top_k, max_paths, vocab_size, chunk_size=512):
    """Upper bounds of marginalize's work on n positions beyond the cached forward: (tokens in
    tree chunks, chunk forwards). A position has min(top_k^d, max_paths) paths of d tokens
    (top_k = 0: all of V, so V^(k_ahead-1) at the last level); top_p can only prune."""
    tokens = chunks = 0
    branching = min(top_k or vocab_size, vocab_size)
    for depth in range(1, k_ahead):
        paths = n * min(branching ** depth, max_paths or branching ** depth)
        tokens += paths * depth  # a leaf and at most depth - 1 ancestors
        chunks += -(-paths // max(1, chunk_size // depth))
    return tokens, chunks


def check_cost(args, top_ks, model, tokens, heads=True):
    """Before any work: say when --positions exceeds the data, and refuse marginalization rows
    over --max_forward_tokens or --max_seconds (probe_seconds; heads: and the MTP heads' row).
    Returns their forward tokens, at most."""
    n = len(tokens) - args.k_ahead  # the positions with targets
    if n < 1:
        raise UserError(f"need more than k_ahead={args.k_ahead} tokens, got {len(tokens)}")
    if n < args.positions:
        print(f"note: --positions={args.positions}, but only {n} positions have k_ahead="
              f"{args.k_ahead} targets in the data: all {n} are evaluated")
    n, V = min(n, args.positions), model.config.vocab_size
    cost = {k: tree_cost(n, args.k_ahead, k, args.max_paths, V, args.chunk_size) for k in top_ks}
    for top_k, (forward_tokens, _) in cost.items():
        if forward_tokens > args.max_forward_tokens:
            raise UserError(f"{row_name(top_k, args.top_p, args.max_paths)} with k_ahead="
                            f"{args.k_ahead} on {n} positions needs up to "
                            f"{min(forward_tokens, 10 ** 300):.1e} forward tokens, over "
                            f"--max_forward_tokens={args.max_forward_tokens:.0e}: lower top_k or "
                            f"k_ahead, set --max_paths, or raise --max_forward_tokens")
    chunks = sum(c for _, c in cost.values())
    seconds = probe_seconds(model, tokens, args.chunk_size, chunks, n if heads else 0)
    if seconds > args.max_seconds:
        raise UserError(f"this table would take about {seconds:,.{0 if seconds >= 10 else 2}f} s "
                        f"here (from a timed probe), "
                        f"over --max_seconds={args.max_seconds:g}: lower --positions, top_k or "
                        f"k_ahead, set --max_paths, or raise --max_seconds")
    return sum(forward_tokens for forward_tokens, _ in cost.values())


@torch.no_grad()
def probe_seconds(model, tokens, chunk_size, chunks, n):
    """Seconds marginalize.evaluate_table should take: `chunks` forwards of chunk_size tokens, one
    of them timed, and the MTP heads' row (head_scores, a loop over n positions) timed on a few."""
    device = next(model.parameters()).device
    size = min(chunk_size, model.config.block_size, len(tokens))
    seq = torch.tensor([int(t) for t in tokens[:size]], device=device)
    next_token_logits(model, seq[None])  # (warm-up: allocations, kernels)
    elapsed = clock(device)
    next_token_logits(model, seq[None])
    seconds = elapsed() * chunks * chunk_size / size
    if getattr(model.config, 'n_future', 1) > 1:
        few = min(8, size - 1)
        head_scores(model, seq[:few + 1], 1)  # (warm-up)
        elapsed = clock(device)
        head_scores(model, seq[:few + 1], few)
        seconds += elapsed() / few * n
    return seconds
