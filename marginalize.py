"""
Marginalization: how far ahead can a next-token (NTP) model already see?

An NTP model defines the distribution of the token k steps ahead (Mehra et al. 2025): sum over
every path of intermediate tokens v_1 .. v_{k-1},

    p(x_{t+k} | x<=t) = sum_{v_1..v_{k-1}} prod_{j<k} p(v_j | x<=t, v_<j) * p(x_{t+k} | x<=t, v_<k)

Exact, it costs |V|^(k-1) forwards per position, so the path set is sparsified: only candidates
among the top_k most probable and/or inside the top_p nucleus of p(v_j | ...) are followed, and at
most max_paths paths (most probable first) are kept per position. Their total probability is the
captured mass; the estimate sums to it, or to 1 with renormalize. marginalize_naive writes the sum
as it is, one forward per path (the reference); marginalize gets the same numbers from one forward
that fills a KV cache, then batched forwards of every position's candidates under a tree attention
mask. Then the paper's Table 1: top-1/top-5 accuracy of x_{t+1} .. x_{t+K} by greedy chaining,
marginalization at several sparsities and the model's MTP heads, with mass and cost.

    python marginalize.py --ckpt=out/ckpt.pt                         # its dataset's val split
    python marginalize.py --ckpt=out/ckpt.pt --input=some.txt --k_ahead=2 --top_k=1,5,all
    python bench.py marginalize --ckpt=out/ckpt.pt                   # batched vs naive
"""
import json
from collections import namedtuple
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from heads import next_token_logits
from drafters import head_scores
from common import UserError, flag, parse_flags, MarginalizeFlags, clock, cli
from metrics import (marginalize_inputs, check_positions, eval_windows, window_batch, tree_cost,
                     check_cost, row_name, format_table, Tally)


# probs (P, k_ahead, V): row [i, k-1] estimates p(x_{t+k} | x<=t) for t = positions[i];
# mass (P, k_ahead): the captured mass (1 at k = 1); forward_tokens / forwards: the cost.
Estimate = namedtuple('Estimate', 'probs mass forward_tokens forwards')


def candidate_mask(dist, top_k=0, top_p=1.0):
    """Bool (n, V): which next tokens of each distribution row (n, V) are followed: the top_k most
    probable (0 = all) and, if top_p < 1, the smallest most-probable set whose probability reaches
    top_p. With both, a token must pass both. The most probable token always passes."""
    V = dist.size(-1)
    if top_p >= 1.0:
        if not top_k or top_k >= V:
            return torch.ones_like(dist, dtype=torch.bool)
        top = dist.topk(top_k, dim=-1).indices
        return torch.zeros_like(dist, dtype=torch.bool).scatter(-1, top, True)
    sorted_p, order = dist.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the mass before this token is not yet top_p
    if top_k:
        keep[:, top_k:] = False
    return torch.zeros_like(keep).scatter(-1, order, keep)


# -----------------------------------------------------------------------------
# the reference: one forward per (position, path)

@torch.no_grad()
def marginalize_naive(model, tokens, positions, k_ahead=2, top_k=0, top_p=1.0, max_paths=0,
                      renormalize=False):
    """The estimate written as the sum it is: every kept path of intermediate tokens gets its own
    forward over x<=t + path, no cache, no masks. Slow, and obviously right: the reference."""
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    check_positions(model, len(tokens), positions, k_ahead, top_p)
    probs, mass, forward_tokens, forwards = [], [], 0, 0
    for t in [int(t) for t in positions]:
        paths = [([], 1.0)]  # (v_1 .. v_j, prod_j p(v_j | x<=t, v_<j)); the empty path first
        probs_t, mass_t = [], []
        for k in range(1, k_ahead + 1):
            # p(x_{t+k} | x<=t, path) for every kept path of k-1 intermediate tokens
            dists = []
            for path, _ in paths:
                seq = torch.cat([tokens[:t + 1], torch.tensor(path, dtype=torch.long,
                                                              device=device)])
                dists.append(F.softmax(next_token_logits(model, seq[None])[0, -1].float(), -1))
                forward_tokens, forwards = forward_tokens + len(seq), forwards + 1
            estimate = sum(prob * dist for (_, prob), dist in zip(paths, dists))
            kept = sum(prob for _, prob in paths)
            probs_t.append(estimate / kept if renormalize else estimate)
            mass_t.append(float(kept))
            if k < k_ahead:  # extend every path by its candidates; keep the most probable
                children = []
                for (path, prob), dist in zip(paths, dists):
                    for v in candidate_mask(dist[None], top_k, top_p)[0].nonzero()[:, 0].tolist():
                        children.append((path + [v], prob * float(dist[v])))
                children.sort(key=lambda c: -c[1])
                paths = children[:max_paths] if max_paths else children
        probs.append(torch.stack(probs_t))
        mass.append(mass_t)
    return Estimate(torch.stack(probs), torch.tensor(mass, device=device), forward_tokens, forwards)


# -----------------------------------------------------------------------------
# the batched estimator: KV cache + tree attention

# One level of the path tree: the paths of j intermediate tokens, one entry per path.
# root: which position (index into positions), parent: index of the path it extends in level
# j-1 (at level 1: the root itself), token: v_j, prob: prod_j p(v_j | x<=t, v_<j).
Paths = namedtuple('Paths', 'root parent token prob')


def children(dist, prob, root, parent, top_k, top_p):
    """Extend paths by their candidates: path i (probability prob[i], next-token distribution
    dist[i]) gets a child of probability prob[i] * dist[i, v] for every kept v."""
    row, token = candidate_mask(dist, top_k, top_p).nonzero(as_tuple=True)
    return Paths(root[row], parent[row], token, prob[row] * dist[row, token])


def keep_most_probable(paths, max_paths):
    """At most max_paths paths per position (0 = all), the most probable ones; grouped by root."""
    if not max_paths:
        return paths
    order = paths.prob.argsort(descending=True, stable=True)
    order = order[paths.root[order].argsort(stable=True)]  # by root, most probable first
    root = paths.root[order]
    rank = torch.arange(len(root), device=root.device) - torch.searchsorted(root, root)
    keep = order[rank < max_paths]
    return Paths(*(field[keep] for field in paths))


def tree_chunk(levels, leaves, positions, n_cached):
    """What one forward evaluates: the paths `leaves` of the deepest level plus all of their
    ancestors (each once), as tokens (n,), position ids (n,) and the attention mask
    (n, n_cached + n). The leaves are the last rows. A node sees the cached prefix x<=t of its
    own position t and, in the chunk, exactly its ancestors and itself: the tree mask."""
    depth = len(levels) - 1
    nodes = [leaves]  # the nodes of every depth that this chunk needs: nodes[d-1] at depth d
    for d in range(depth, 1, -1):
        nodes.insert(0, levels[d].parent[nodes[0]].unique())
    index = torch.cat(nodes)
    depth_of = torch.cat([torch.full_like(ids, d) for d, ids in enumerate(nodes, start=1)])
    tokens = torch.cat([levels[d].token[ids] for d, ids in enumerate(nodes, start=1)])
    # column e-1 of ancestors: the node's ancestor at depth e (itself at its depth), -1 below it
    ancestors = torch.full((len(index), depth), -1, dtype=torch.long, device=index.device)
    roots = index.clone()
    for e in range(depth, 0, -1):  # every node at depth >= e climbs from depth e to e - 1
        up = depth_of >= e
        ancestors[up, e - 1] = roots[up]
        roots[up] = levels[e].parent[roots[up]]  # at e = 1 the parent is the root
    t = positions[roots]
    sees_prefix = torch.arange(n_cached, device=t.device)[None, :] <= t[:, None]
    # node i sees node j iff j is i's ancestor at j's depth (the same root is implied)
    sees_tree = ancestors[:, depth_of - 1] == index[None, :]
    return tokens, t + depth_of, torch.cat([sees_prefix, sees_tree], dim=1)


@torch.no_grad()
def marginalize(model, tokens, positions, k_ahead=2, top_k=0, top_p=1.0, max_paths=0,
                renormalize=False, chunk_size=512, bar=None):
    """Estimate p(x_{t+k} | x<=t), k = 1..k_ahead, for every t in positions (indices into tokens, a
    sequence of at most block_size tokens) by the sparsified sum over paths (the module's). The
    paths grow one level (one intermediate token) at a time. Level j's nodes are evaluated in chunks
    of at most chunk_size tokens, each a forward after the cached sequence with a tree attention
    mask; then the cache is rolled back, so a chunk re-evaluates its leaves' shared ancestors (none
    for k_ahead = 2, about 1/top_k extra for k_ahead = 3). Returns an Estimate."""
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    positions = torch.as_tensor(positions, dtype=torch.long, device=device)
    check_positions(model, len(tokens), positions, k_ahead, top_p)
    n_cached = len(tokens)
    cache = model.new_cache(n_cached + max(chunk_size, k_ahead))  # cache slots are not positions
    ntp = F.softmax(next_token_logits(model, tokens[None], cache=cache)[0, positions].float(), -1)
    P, V = ntp.shape
    probs = ntp.new_zeros(P, k_ahead, V)
    probs[:, 0] = ntp
    mass = ntp.new_zeros(P, k_ahead)
    mass[:, 0] = 1.0
    forward_tokens, forwards = n_cached, 1
    roots = torch.arange(P, device=device)
    levels = [None]  # levels[j]: the kept paths of j intermediate tokens
    frontier = children(ntp, torch.ones_like(mass[:, 0]), roots, roots, top_k, top_p)
    for depth in range(1, k_ahead):
        level = keep_most_probable(frontier, max_paths)
        levels.append(level)
        mass[:, depth].index_add_(0, level.root, level.prob)
        frontier = []
        # a chunk holds its leaves and up to depth-1 ancestors per leaf: <= chunk_size tokens
        leaves_per_chunk = max(1, chunk_size // depth)
        for leaves in torch.arange(len(level.prob), device=device).split(leaves_per_chunk):
            idx, pos, mask = tree_chunk(levels, leaves, positions, n_cached)
            logits = next_token_logits(model, idx[None], cache=cache, pos=pos, attn_mask=mask)
            cache.rollback(n_cached)  # forget the candidates: the next chunk sees only x
            dist = F.softmax(logits[0, -len(leaves):].float(), dim=-1)  # p(x_{t+depth+1} | path)
            prob, root = level.prob[leaves], level.root[leaves]
            probs[:, depth].index_add_(0, root, prob[:, None] * dist)
            if depth + 1 < k_ahead:
                frontier.append(children(dist, prob, root, leaves, top_k, top_p))
            forward_tokens, forwards = forward_tokens + len(idx), forwards + 1
            if bar is not None:
                bar.update()
        if frontier:
            frontier = Paths(*(torch.cat(field) for field in zip(*frontier)))
    if renormalize:
        probs /= mass[:, :, None]
    return Estimate(probs, mass, forward_tokens, forwards)


# -----------------------------------------------------------------------------
# evaluation: the accuracy table

def default_top_ks(vocab_size, all_vocab_max=128):
    """top_k 1 (greedy chaining), 2, 5, 10, 50 where below V, then all of V (0) if V is small."""
    return [k for k in (1, 2, 5, 10, 50) if k < vocab_size] + [0] * (vocab_size <= all_vocab_max)


@torch.no_grad()
def evaluate_table(model, tokens, positions=256, k_ahead=3, top_ks=None, top_p=1.0, max_paths=0,
                   renormalize=False, chunk_size=512, window=0, seed=0, progress=False):
    """The rows of the accuracy table on the same positions and targets: marginalization for
    every top_k in top_ks (0 = all of V), then a model's MTP heads (head k in column k). Each row
    is a dict: name, method, n, top1 / top5 / mass (lists over k = 1..k_ahead, mass None for
    heads), forward_tokens, forwards, seconds. window: tokens per window (0 = block_size)."""
    device = next(model.parameters()).device
    window = min(window or model.config.block_size, model.config.block_size)
    windows = eval_windows(len(tokens), window, k_ahead, positions, seed)
    batches = [window_batch(tokens, start, n, k_ahead, device) for start, n in windows]
    rows = []
    for top_k in (default_top_ks(model.config.vocab_size) if top_ks is None else top_ks):
        name = row_name(top_k, top_p, max_paths)
        tally, cost, elapsed = Tally(k_ahead), [0, 0], clock(device)
        total = sum(tree_cost(n, k_ahead, top_k, max_paths, model.config.vocab_size, chunk_size)[1]
                    for _, n in windows)  # (top_p < 1 may end it early)
        with tqdm(desc=name, unit='chunk', total=total, disable=not progress, leave=False) as bar:
            for seq, targets in batches:
                est = marginalize(model, seq, torch.arange(len(targets)), k_ahead, top_k, top_p,
                                  max_paths, renormalize, chunk_size, bar)
                tally.add(est.probs, targets, est.mass)
                cost = [cost[0] + est.forward_tokens, cost[1] + est.forwards]
        rows.append(dict(name=name, method='marginal', top_k=top_k, top_p=top_p,
                         max_paths=max_paths, **tally.result(), forward_tokens=cost[0],
                         forwards=cost[1], seconds=elapsed()))
    n_future = getattr(model.config, 'n_future', 1)
    if n_future > 1:
        tally, cost, elapsed = Tally(k_ahead), 0, clock(device)
        for seq, targets in batches:
            logits = head_scores(model, seq, len(targets))  # (n, n_future, V); head k: x_{t+k}
            tally.add(logits[:, :k_ahead].float(), targets)
            cost += len(seq)
        rows.append(dict(name=f"MTP heads (n_future={n_future})", method='heads', **tally.result(),
                         forward_tokens=cost, forwards=len(batches), seconds=elapsed()))
    return rows


# -----------------------------------------------------------------------------
# command line

@dataclass
class MarginalizeConfig(MarginalizeFlags):
    """python marginalize.py --ckpt=out/ckpt.pt [--name=value ...]
The accuracy table: x_{t+1}..x_{t+k_ahead} by greedy chaining, marginalization and the MTP heads."""
    renormalize: bool = flag(False, "divide the estimate by the captured mass")
    quiet: bool = flag(False, "no progress bars")


def main(argv):
    args = parse_flags(argv, MarginalizeConfig())
    if not args.ckpt:
        raise UserError("--ckpt=PATH is required")
    top_ks, model, tokens, source = marginalize_inputs(args)
    top_ks = top_ks or default_top_ks(model.config.vocab_size)
    cost = check_cost(args, top_ks, model, tokens)
    if not args.quiet:
        print(f"{len(top_ks)} marginalization rows: up to {cost:,} forward tokens on paths")
    rows = evaluate_table(model, tokens, args.positions, args.k_ahead, top_ks, args.top_p,
                          args.max_paths, args.renormalize, args.chunk_size, args.window,
                          args.seed, progress=not args.quiet)
    print(f"{args.ckpt} on {source}: {rows[0]['n'][0]} positions, k_ahead={args.k_ahead}")
    print(format_table(rows, args.k_ahead))
    result = dict(ckpt=args.ckpt, data=source, k_ahead=args.k_ahead, positions=rows[0]['n'][0],
                  rows=rows)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    cli(main)
