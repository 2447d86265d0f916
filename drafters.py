"""
How MTP heads draft: each head design's drafter, and a separate draft model's. Speculative
decoding (sample.py) asks a drafter for guesses of the next tokens, verifies them with the target
and tells the drafter what was verified. A drafter holds its own decode-time state (a KV cache,
the chain's entries), with its invariant written beside it:

    observe(seq, trunk_hidden, start)  the target has verified seq[:-1]; seq ends with the token
            x_{j+1} it just emitted; trunk_hidden: the target's states [h_0 .. h_attach], each
            (1, m, C), at the positions it computed this step, the last one j; start: where the
            target's window begins in seq (cache positions are window positions)
    draft(seq, k) -> (drafts (<= k,), q (<= k, V))  guesses of x_{j+2}, x_{j+3}, ... and the
            distributions they were drawn from
    propose: head states (..., C) -> (draft tokens, their q (..., V)): DraftVocab, the shared
            unembedding over the draft vocabulary, then the decoding's sampling settings (pick)
head_scores: what each head drafts at every position of a sequence (marginalize.py's heads row).
"""
import torch
from torch.nn import functional as F

from model import KVCache, UserError
from head_designs import BlockHeads, ResBlockHeads, SequentialHeads, mix


class DraftVocab:
    """propose(h): drafts from head states h (..., C) through the shared ln_f and unembedding,
    restricted to a draft vocabulary (FR-Spec, Zhao et al. 2025: the most frequent token ids;
    None: all), then pick (logits -> (tokens, q)). Its unembedding rows are gathered once. Drafts
    never leave the subset and q is 0 outside it; verification keeps the full vocabulary, and the
    residual max(0, p - q) covers the rest, so the output stays exact."""

    def __init__(self, model, pick, ids=None):
        weight, ln, self.pick = model.lm_head.weight, model.transformer.ln_f, pick
        self.ln_f = ln.normalized_shape, ln.weight, ln.bias, ln.eps  # (a module call costs more)
        self.ids = None if ids is None else torch.as_tensor(ids, device=weight.device)
        self.weight, self.vocab_size = weight if ids is None else weight[self.ids], weight.size(0)

    def __call__(self, h):
        tokens, q = self.pick(F.linear(F.layer_norm(h, *self.ln_f), self.weight))
        if self.ids is None:
            return tokens, q
        full = q.new_zeros(*q.shape[:-1], self.vocab_size).index_copy_(-1, self.ids, q)
        return self.ids[tokens], full


def heads_drafter(model, propose):
    """The drafter of the model's head design (one per design: DRAFTERS)."""
    if model.config.n_future < 2:
        raise UserError("self-speculative decoding needs MTP heads, but this checkpoint has "
                        "n_future=1; decode without --speculative, or give a --draft model")
    return DRAFTERS[type(model.heads)](model, propose)


class Drafter:
    """What every drafter shares: the drafts of the last observe(), handed out k at a time, and
    a row-local drafter's observe()."""
    forwards = 0  # forwards of a separate draft model (none: the heads ride on the target's)
    row_local = False  # True: draft_rows drafts from each row's last verified position alone
    reads_tokens = True  # draft_rows reads the tokens just emitted

    def __init__(self, model, propose):
        self.model, self.propose = model, propose
        self.drafts = torch.empty(0, dtype=torch.long, device=model.lm_head.weight.device)
        self.q = torch.empty(0, model.config.vocab_size, device=self.drafts.device)

    def draft(self, seq, k):
        return self.drafts[:k], self.q[:k]

    def observe(self, seq, trunk_hidden, start):
        """A row-local drafter's: draft_rows on the last verified position j and x_{j+1} (when
        it reads tokens)."""
        tokens = torch.tensor(seq[-1:], device=self.drafts.device) if self.reads_tokens else None
        drafts, q = self.draft_rows([h[0, -1:] for h in trunk_hidden], tokens)
        self.drafts, self.q = drafts[0], q[0]


class ResBlockDrafter(Drafter):
    """Heads 2..n at the last verified position j alone: a ResBlock reads no other position.
    Invariant: it holds no state of past positions, so there is nothing to roll back."""
    row_local, reads_tokens = True, False

    def draft_rows(self, trunk_hidden, tokens):
        """Drafts (B, n-1) and q (B, n-1, V) of B rows from their states [h_0 ..] (B, C) each
        at their last verified position (tokens, the ones just emitted, are not read)."""
        states = torch.stack([head(trunk_hidden) for head in list(self.model.heads)[1:]], dim=1)
        return self.propose(states)


class BlockDrafter(Drafter):
    """Heads 2..n run their blocks over the verified positions, with a KV cache of their own.
    Invariant: self.cache holds heads 2..n at window positions 0 .. cache.length - 1, all of
    them verified (their trunk states never change): it grows by the rows observed and starts
    again when the window does."""

    def __init__(self, model, propose):
        super().__init__(model, propose)
        self.cache = KVCache(model.heads.cache_layers - model.heads.depth, model.config.block_size)

    def observe(self, seq, trunk_hidden, start):
        m, j = trunk_hidden[0].size(1), len(seq) - 2 - start  # m rows: positions j-m+1 .. j
        self.cache.rollback(min(self.cache.length, j + 1 - m))  # (to 0 after the window slid)
        mask, heads = self.model.default_mask(trunk_hidden[0], self.cache, None), self.model.heads
        states = [head(trunk_hidden, self.cache, i * heads.depth, mask)[0, -1]
                  for i, head in enumerate(list(heads)[1:])]
        self.cache.advance(m)
        self.drafts, self.q = self.propose(torch.stack(states))


class ChainDrafter(Drafter):
    """Sequential heads chain at the last verified position j: head 2 reads s_1[j] and the token
    just emitted, head k reads s_{k-1}[j] and head k-1's draft (SequentialHeads.chain).
    - With attention, head k at position s reads x_{s+k-1}, and the chain runs over every
      position not cached yet. Invariant: self.cache (layer k-2 = head k) holds window positions
      0 .. cache.length - 1 whose heads read verified tokens only (s + n - 1 <= j): drafts and
      the token just emitted are never cached. self.entry keeps s_1 (or z_2) per position.
    - An MLP body reads no other position: the chain runs on row j alone, with no cache and no
      mask, as raw ops (row_chain)."""

    def __init__(self, model, propose):
        super().__init__(model, propose)
        config = model.config
        if config.head_attention:
            self.cache = KVCache(config.n_future - 1, config.block_size)
            self.entry = torch.empty(config.block_size, config.n_embd, device=self.drafts.device)
        else:
            self.rows, self.row_local = row_weights(model), True

    def draft_rows(self, trunk_hidden, tokens):
        """Drafts (B, n-1) and q (B, n-1, V) of B rows from their states [h_0 ..] (B, C) each at
        their last verified position j and the tokens (B,) just emitted, x_{j+1} (MLP bodies)."""
        return row_chain(self.rows, mix(self.model.heads.whs_coef, trunk_hidden), tokens,
                         self.propose)

    def observe(self, seq, trunk_hidden, start):
        if self.row_local:  # an MLP body: the chain on row j alone
            return super().observe(seq, trunk_hidden, start)
        m, j = trunk_hidden[0].size(1), len(seq) - 2 - start  # m rows: positions j-m+1 .. j
        self.entry[j + 1 - m:j + 1] = mix(self.model.heads.whs_coef, trunk_hidden)[0]
        self.cache.rollback(min(self.cache.length, j + 1 - m))  # (to 0 after a slide)
        entry = self.entry[self.cache.length:j + 1]
        tokens = torch.tensor(seq[start + self.cache.length + 1:],  # x_{s+1}
                              device=self.drafts.device)
        self.drafts, self.q = self.model.heads.chain(self.model, entry, tokens, self.propose,
                                                     self.cache)
        # keep the positions whose heads read verified tokens only
        self.cache.advance(len(tokens))
        self.cache.rollback(max(0, j + 2 - self.model.config.n_future))


def row_weights(model, max_table_vocab=4096):
    """MLP-bodied sequential heads as plain tensors (matrices transposed), gathered once per
    decoding, for row_chain: on a CPU a module call or a parameter lookup costs more than a
    128-wide op on one row. The token half of M_k: a V x C table (token_table) up to
    max_table_vocab tokens (it costs V C^2 per head, once), else computed per row."""
    def norm(ln):
        return ln.normalized_shape, ln.weight, ln.bias
    C, wte = model.config.n_embd, model.transformer.wte.weight
    small = model.config.vocab_size <= max_table_vocab
    heads = [(h.token_table(wte).__getitem__ if small else lambda x, h=h: h.token_table(wte[x]),
              norm(h.norm_state), h.combine.weight[:, :C].t(), norm(h.block.ln), h.block.mlp)
             for h in model.heads]
    return [(table, ln_s, w_s, ln, mlp.c_fc.weight.t(), mlp.c_fc.bias, mlp.c_proj.weight.t(),
             mlp.c_proj.bias, mlp.gelu.approximate) for table, ln_s, w_s, ln, mlp in heads]


def row_chain(heads, state, token, propose):
    """SequentialHeads.chain with MLP bodies, as raw ops, on B rows: state (B, C), token (B,);
    for k = 2..n, z = M_k[:, :C] norm(s) + table_k(x), s_k = z + MLP(LN(z)), and head k's
    draft from s_k (propose). Returns drafts (B, n-1) and q (B, n-1, V)."""
    drafts, q = [], []
    for table, ln_s, w_s, ln, w_fc, b_fc, w_proj, b_proj, gelu in heads:
        z = torch.addmm(table(token), F.layer_norm(state, *ln_s), w_s)
        h = F.layer_norm(z, *ln) @ w_fc
        state = torch.addmm(z, F.gelu(h if b_fc is None else h + b_fc, approximate=gelu), w_proj)
        state = state if b_proj is None else state + b_proj
        token, q_k = propose(state)
        drafts.append(token)
        q.append(q_k)
    return torch.stack(drafts, dim=1), torch.stack(q, dim=1)


class ModelDrafter:
    """Two-model decoding: a smaller draft model drafts k tokens, one forward each, in a window of
    its own (sample.Window); none before the target verified the prompt. A draft model with a
    block_size >= the target's follows the target's window (so a draft equal to the target is
    always accepted); a smaller one slides its own. Invariant: after observe(), its window's
    cache holds verified tokens only; draft() adds its drafts, which the next observe() drops."""

    def __init__(self, window, target_window, pick):
        self.window, self.target_window, self.pick = window, target_window, pick
        self.follow = window.block_size >= target_window.block_size
        self.verified, self.forwards = False, 0

    def observe(self, seq, trunk_hidden, start):
        self.window.rollback(len(seq) - 1)
        self.verified = True

    def draft(self, seq, k):
        window, drafts, q = self.window, [], []
        if self.follow and window.start != self.target_window.start:
            window.start = self.target_window.start
            window.cache.rollback(0)
        for j in range(k if self.verified else 0):
            window.slide(len(seq) + j)
            token, q_j = self.pick(window.forward(seq + drafts)[-1])
            drafts, q = drafts + [int(token)], q + [q_j]
        self.forwards += len(drafts)
        q = torch.stack(q) if q else torch.empty(0, self.window.model.config.vocab_size)
        return torch.tensor(drafts, dtype=torch.long, device=window.device), q.to(window.device)


def head_scores(model, seq, n):
    """Logits (n, n_future, V): head k's prediction of x_{t+k} at positions t < n of seq (1-D),
    from x<=t alone, as the heads draft (their drafter, a position at a time): sequential heads
    read the chain's own greedy guesses, never the true x_{t+1}..x_{t+k-1}."""
    logits, _, trunk_hidden = model(seq[None], n_heads=1, return_hidden=True)
    drafter = heads_drafter(model, DraftVocab(model, lambda scores: (scores.argmax(-1), scores)))
    rows, tokens = [], seq.tolist()
    for t in range(n):
        guess = int(logits[0, t, 0].argmax())
        drafter.observe(tokens[:t + 1] + [guess], [h[:, t:t + 1] for h in trunk_hidden], 0)
        rows.append(torch.cat([logits[0, t, :1], drafter.draft(tokens, model.config.n_future)[1]]))
    return torch.stack(rows)


DRAFTERS = {BlockHeads: BlockDrafter, ResBlockHeads: ResBlockDrafter, SequentialHeads: ChainDrafter}
