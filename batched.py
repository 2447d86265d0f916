"""
Batched decoding: many prompts at once, each row exactly what decoding it alone gives
(sample.generate and sample.generate_speculative, the one-prompt loops this file mirrors).
Vanilla, self-speculative (every head design) and two-model, in one loop.

Rows go ragged: prompts differ in length, and each step every row accepts its own number of
drafts. The bookkeeping, named:
    lengths[b]  how many of row b's tokens its cache holds; they sit at window positions
                0 .. lengths[b] - 1, and a cache slot is its position (Batch)
    feeds[b]    what row b feeds a step: its tokens the cache lacks (the prompt, later the token
                just emitted), then its drafts. Feeds are padded on the right to the longest, T.
    positions   row b's token t sits at lengths[b] + t and attends to slots <= lengths[b] + t:
                its own tokens only, never a padding slot or a stale one (Batch.forward)
    rollback    per row: lengths[b] moves back to the verified tokens, O(1) as in KVCache
Finished rows leave the batch: their cache rows are dropped, so they cost nothing more (masking
them would keep paying their share of every forward until the last row ends).

The window: batched rows do not slide. Every prompt plus its max_new_tokens must fit block_size
(the draft model's too), or the request is refused with a one-line error; decode a longer one
alone (sample.py without --prompts), which slides.
"""
import torch

from model import UserError
from decoding import Decoding, probs_from_logits, verify
from drafters import DraftVocab, heads_drafter


class Batch:
    """A model's view of a batch of rows (decoding runs): the forward of ragged feeds, and their
    KV cache, which the model writes through update(): (B, n_head, max_len, head_dim) per layer,
    allocated on first use. Invariant: row b's slots 0 .. lengths[b] - 1 hold its tokens at
    those positions; later slots are stale, and a forward writes its T tokens at lengths[b] ..
    lengths[b] + T - 1 before anything reads them (it gives the model their positions and mask:
    the cache has no single length)."""

    def __init__(self, model, runs, n_drafts, name='the model'):
        for run in runs:
            if run.n_prompt + run.max_new_tokens > model.config.block_size:
                raise UserError(
                    f"a prompt of {run.n_prompt} tokens + max_new_tokens {run.max_new_tokens} "
                    f"does not fit {name}'s block_size {model.config.block_size}: batched rows "
                    f"do not slide their window; decode it alone, or ask for fewer tokens")
        self.model, self.device = model, model.lm_head.weight.device
        self.max_len = model.config.block_size + n_drafts + 1  # (short rows padded to a long feed)
        n_layers = model.num_cache_layers()
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.lengths = torch.zeros(len(runs), dtype=torch.long, device=self.device)

    def forward(self, feeds):
        """feeds: one token list per row, what follows its cached tokens -> next-token logits
        (B, T, V) and the trunk states [h_0 .. h_attach], each (B, T, C), padded to the longest
        feed T. Afterwards row b's cache holds its feed too (and no padding)."""
        T, config = max(map(len, feeds)), self.model.config
        idx = torch.tensor([feed + [0] * (T - len(feed)) for feed in feeds], device=self.device)
        pos = self.lengths[:, None] + torch.arange(T, device=self.device)  # (B, T): also slots
        self.end = int(self.lengths.max()) + T  # self.end and self.slots: where update() writes
        if self.end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.end} positions > max_len {self.max_len}")
        self.slots = pos[:, None, :, None].expand(len(pos), config.n_head, T,
                                                  config.n_embd // config.n_head)
        mask = torch.arange(self.end, device=self.device) <= pos[:, None, :, None]  # (B,1,T,end)
        # positions past the window (padding; a draft model's drafts a row will not keep) are
        # clamped: computed, never used
        logits, _, trunk_hidden = self.model(
            idx, cache=self, pos=pos.clamp(max=config.block_size - 1),
            attn_mask=mask, n_heads=1, return_hidden=True)
        self.lengths = self.lengths + torch.tensor(list(map(len, feeds)), device=self.device)
        return logits[:, :, 0], trunk_hidden

    def update(self, layer, k, v):  # (the model's cache interface)
        if self.k[layer] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        self.k[layer].scatter_(2, self.slots, k)
        self.v[layer].scatter_(2, self.slots, v)
        return self.k[layer][:, :, :self.end], self.v[layer][:, :, :self.end]

    def advance(self, T):  # (forward() sets the lengths: each row's own feed, no padding)
        pass

    def rollback(self, lengths):
        """Row b keeps its first lengths[b] tokens (the verified ones; at most what it holds)."""
        lengths = torch.as_tensor(lengths, device=self.device)
        if not bool(((0 <= lengths) & (lengths <= self.lengths)).all()):
            raise ValueError(f"cannot roll back rows of lengths {self.lengths.tolist()} to "
                             f"{lengths.tolist()}")
        self.lengths = lengths

    def keep(self, rows):
        """Only the rows (indices) stay, in that order: the others finished."""
        if len(rows) < len(self.lengths):
            rows = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.k = [None if k is None else k[rows] for k in self.k]
            self.v = [None if v is None else v[rows] for v in self.v]
            self.lengths = self.lengths[rows]


@torch.inference_mode()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                   stop=(), generator=None, make_drafter=None, n_drafts=0):
    """Decode a list of prompts at once: sample.generate_speculative's loop (draft, verify, roll
    back, emit) on ragged rows, each exactly what it gives its prompt alone. make_drafter(runs,
    pick) drafts up to n_drafts tokens per row (self_drafter, model_drafter; None: vanilla).
    max_new_tokens: one for all, or one per prompt. Returns a Generation per prompt."""
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else \
        [max_new_tokens] * len(prompts)
    runs = [Decoding(prompt, budget, temperature, top_k, top_p, stop, generator, n_drafts)
            for prompt, budget in zip(prompts, budgets)]
    live = [run for run in runs if run.running()]  # the batch's rows, in cache order
    batch = Batch(model, live, n_drafts)  # (refuses rows that do not fit the window)
    drafter = make_drafter(live, runs[0].pick) if make_drafter and live else NoDrafts(model)
    while live:
        drafts = drafter.draft(live, [min(n_drafts, run.budget() - 1) for run in live])
        lengths = batch.lengths.tolist()
        feeds = [run.seq[n:] + d.tolist() for run, n, (d, _) in zip(live, lengths, drafts)]
        logits, trunk_hidden = batch.forward(feeds)  # (B, T, V): each row's feed, padded
        p_all = probs_from_logits(logits, **runs[0].sampling)  # (every row's settings)
        verified = []  # per row: how many tokens its cache keeps
        for b, (run, feed, (d, q)) in enumerate(zip(live, feeds, drafts)):
            p = p_all[b, len(feed) - len(d) - 1:len(feed)]  # the last k+1 rows of its feed
            new = verify(p, d, q, run.greedy, run.generator)
            verified.append(len(run.seq) + len(new) - 1)  # the free token is fed next step
            run.emit(new, len(d))
        batch.rollback(verified)
        rows = [b for b, run in enumerate(live) if run.running()]  # finished rows leave
        batch.keep(rows)
        drafter.keep(rows)
        live, last = [live[b] for b in rows], [verified[b] - 1 - lengths[b] for b in rows]
        if live:  # row b's last verified token is its feed's token last[b]
            drafter.observe(live, [h[rows] for h in trunk_hidden], last)
    return [run.result() for run in runs]


# -----------------------------------------------------------------------------
# drafting for a batch: draft(runs, ks) -> [(drafts (k_b,), q (k_b, V))] per row;
# keep(rows): only those rows stay; observe(runs, trunk_hidden, last): the target verified row
# b's tokens up to index last[b] of its feed, trunk_hidden: its states, each (B, T, C)

class NoDrafts:
    """Vanilla decoding: a drafter that never drafts."""

    def __init__(self, model):
        device = model.lm_head.weight.device
        self.none = (torch.empty(0, dtype=torch.long, device=device),
                     torch.empty(0, model.config.vocab_size, device=device))

    def draft(self, runs, ks):
        return [self.none] * len(runs)

    def keep(self, rows):
        pass

    def observe(self, runs, trunk_hidden, last):
        pass


class EachRow:
    """One-prompt drafters (drafters.py), one per row, each fed its own row: exact for every
    design, at the price of one drafter call per row (block heads, heads with attention)."""

    def __init__(self, drafters):
        self.drafters = drafters

    def draft(self, runs, ks):
        return [d.draft(run.seq, k) for d, run, k in zip(self.drafters, runs, ks)]

    def observe(self, runs, trunk_hidden, last):
        for b, (d, run) in enumerate(zip(self.drafters, runs)):
            d.observe(run.seq, [h[b:b + 1, :last[b] + 1] for h in trunk_hidden], 0)

    def keep(self, rows):
        self.drafters = [self.drafters[b] for b in rows]


class LastRows:
    """Drafters that read each row's last verified position alone (ResBlock heads, MLP-bodied
    sequential heads): every row in one call of drafter.draft_rows."""

    def __init__(self, drafter):
        self.drafter, self.drafts = drafter, None

    def draft(self, runs, ks):
        if self.drafts is None:  # nothing verified yet: the prompt's forward drafts nothing
            return [self.drafter.draft(run.seq, 0) for run in runs]
        return [(self.drafts[b, :k], self.q[b, :k]) for b, k in enumerate(ks)]

    def observe(self, runs, trunk_hidden, last):
        rows = torch.arange(len(runs), device=trunk_hidden[0].device)
        at_last = [h[rows, torch.tensor(last, device=rows.device)] for h in trunk_hidden]
        tokens = torch.tensor([run.seq[-1] for run in runs], device=rows.device)
        self.drafts, self.q = self.drafter.draft_rows(at_last, tokens)

    def keep(self, rows):
        pass  # observe() drafts anew for the rows that stay


def self_drafter(model, draft_vocab=None):
    """make_drafter for self-speculative decoding: the heads of the model's design (drafting
    from the token ids draft_vocab only, if given)."""
    def make(runs, pick):
        propose = DraftVocab(model, pick, draft_vocab)  # (its rows gathered once, shared)
        drafter = heads_drafter(model, propose)
        if drafter.row_local:
            return LastRows(drafter)
        return EachRow([drafter] + [heads_drafter(model, propose) for _ in runs[1:]])
    return make


class DraftModelRows:
    """Two-model decoding for a batch: the draft model decodes every row at once, in a Batch of
    its own. Invariant: after observe(), its cache holds verified tokens only (draft() adds
    drafts, which the next observe() rolls back)."""

    def __init__(self, draft_model, runs, n_drafts, pick):
        self.batch, self.pick = Batch(draft_model, runs, n_drafts, 'the draft model'), pick
        self.verified = False  # (nothing to draft from before the target verified the prompt)

    def draft(self, runs, ks):
        """Every row drafts max(ks) tokens, one forward each, and keeps its first k_b."""
        B, V, device = len(runs), self.batch.model.config.vocab_size, self.batch.device
        tokens = [torch.empty(B, 0, dtype=torch.long, device=device)]
        q = [torch.empty(B, 0, V, device=device)]
        feeds = [run.seq[n:] for run, n in zip(runs, self.batch.lengths.tolist())]  # uncached
        for _ in range(max(ks) if self.verified else 0):
            logits, _ = self.batch.forward(feeds)
            last = torch.tensor([len(feed) - 1 for feed in feeds], device=device)
            token, q_j = self.pick(logits[torch.arange(B, device=device), last])
            tokens.append(token[:, None])
            q.append(q_j[:, None])
            feeds = [[t] for t in token.tolist()]
        tokens, q = torch.cat(tokens, dim=1), torch.cat(q, dim=1)  # (B, max k), (B, max k, V)
        for run, k in zip(runs, ks):
            run.stats.draft_forwards += min(k, tokens.size(1))  # as decoding alone counts them
        return [(tokens[b, :k], q[b, :k]) for b, k in enumerate(ks)]

    def observe(self, runs, trunk_hidden, last):
        verified = torch.tensor([len(run.seq) - 1 for run in runs], device=self.batch.device)
        self.batch.rollback(torch.minimum(self.batch.lengths, verified))
        self.verified = True

    def keep(self, rows):
        self.batch.keep(rows)


def model_drafter(draft_model, n_drafts):
    """make_drafter for two-model decoding: a smaller model drafts n_drafts tokens a step."""
    return lambda runs, pick: DraftModelRows(draft_model, runs, n_drafts, pick)
