"""
What every decode loop shares (sample.py: one prompt; batched.py: many at once):
- the distribution tokens are drawn from (probs_from_logits) and the draw (draw);
- the acceptance rule of speculative decoding (verify), exact against vanilla sampling;
- tau and the other counters of a decoding (Stats), and a run's bookkeeping (Decoding: its
  sequence, budget, stop sequence and timing).
"""
import math
import time
from collections import namedtuple

import torch
from torch.nn import functional as F

from model import UserError


# -----------------------------------------------------------------------------
# the distribution tokens are drawn from, and the acceptance rule

def probs_from_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (..., V) -> the probabilities tokens are drawn from: softmax(logits / temperature),
    restricted to the top_k most probable tokens (0: all), then to the smallest set of most probable
    tokens whose mass reaches top_p (1: all), renormalized. temperature 0 (greedy) gives a one-hot
    at the argmax. Vanilla sampling, the drafts' q and the target's p all come from here: the
    speculative output is distributed exactly as sampling from this function's output."""
    logits = logits.float()
    if temperature == 0:  # (scatter_: F.one_hot checks its ids' range, two syncs a call)
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # minus the max first: a tiny temperature (1e-45) then sends the others to -inf, not inf - inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float('-inf'))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more probable ones already reach top_p (the first always stays)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs, greedy, generator=None):
    """One token per row of probs (..., V): the argmax when greedy, else a sample, argmax_x
    p(x) / E_x with E_x ~ Exp(1) (the exponential race: P(x wins) = p(x)). That is
    torch.multinomial's own one-sample path (on the CPU: the same tokens, draw for draw; tested),
    without its checks of p (a max, a min and a sum, each read back on the host)."""
    if greedy:
        return probs.argmax(-1)
    flat = probs.reshape(-1, probs.size(-1))
    race = flat / torch.empty_like(flat).exponential_(generator=generator)
    return race.argmax(-1).view(probs.shape[:-1])


def verify(p, drafts, q, greedy, generator=None):
    """The acceptance rule, shared by self-speculative and two-model decoding.

    p:      (k+1, V) target probabilities; p[j] is the distribution of the token at draft j's
            place given everything before it (p[k]: the token after the last draft)
    drafts: (k,) draft tokens, drafts[j] drawn from q[j]
    q:      (k, V) the draft probabilities
    Returns the emitted tokens (a list of 1..k+1 ints): the accepted drafts, then one target token.

    greedy:   accept drafts while they equal argmax p; then argmax p at the first mismatch (or
              after the last draft) is free. This is vanilla greedy decoding, token for token.
    sampling: accept drafts[j] with probability min(1, p[j](x)/q[j](x)), in order; at the first
              rejection draw from norm(max(0, p[j] - q[j])) and stop; if all k are accepted draw
              a bonus token from p[k]. The emitted tokens are distributed exactly as tokens drawn
              from p one at a time. (With one-hot p and q this rule IS the greedy rule.)
    """
    k = drafts.numel()
    if greedy:
        target = p.argmax(-1)
        n_accepted = int((target[:k] == drafts).long().cumprod(0).sum())
        return target[:n_accepted + 1].tolist()
    rows = torch.arange(k, device=p.device)
    u = torch.rand(k, generator=generator, device=p.device)
    accept = u * q[rows, drafts] < p[rows, drafts]   # u < p/q; q(x) > 0 since x was drawn from q
    n_accepted = int(accept.long().cumprod(0).sum())  # up to the first rejection
    if n_accepted < k:
        residual = (p[n_accepted] - q[n_accepted]).clamp(min=0)
        # p == q cannot reject, but rounding can land here with residual == 0: then draw from p
        last = torch.where(residual.sum() > 0, residual, p[n_accepted])
    else:
        last = p[k]
    return drafts[:n_accepted].tolist() + [int(draw(last, False, generator))]


# -----------------------------------------------------------------------------
# a decoding's counters and bookkeeping

class Stats:
    """Counters of decoding runs and their metrics (summary()): tau = tokens emitted per target
    forward (accepted drafts + the free/bonus token) over the decode forwards (a run's first
    forward prefills the prompt and is left out: vanilla has tau = 1, perfect drafts n_future,
    resp. gamma + 1); acceptance[j] = P(draft j+1 accepted | drafts 1..j accepted) = accepted[j]
    / drafted[j] (drafted: drafts j+1 verified after j accepted ones); tokens/s."""

    def __init__(self, n_draft_positions=0):
        self.new_tokens = self.target_forwards = self.draft_forwards = 0
        self.decode_forwards = self.decode_tokens = 0  # after each run's first forward
        self.drafted, self.accepted = [0] * n_draft_positions, [0] * n_draft_positions
        self.time_s = 0.0

    def step(self, n_drafts, n_accepted):
        """One target forward that verified n_drafts drafts and accepted n_accepted."""
        if self.target_forwards > 0:  # a run's first forward prefills the prompt: not in tau
            self.decode_forwards += 1
            self.decode_tokens += n_accepted + 1
        self.target_forwards += 1
        for j in range(min(n_accepted + 1, n_drafts)):
            self.drafted[j] += 1
            self.accepted[j] += j < n_accepted

    def add(self, other):
        """Sum another run's counters into these (same number of draft positions)."""
        for name, mine in vars(self).items():
            theirs = getattr(other, name)
            setattr(self, name, list(map(sum, zip(mine, theirs))) if isinstance(mine, list)
                    else mine + theirs)
        return self

    def summary(self):
        return dict(
            new_tokens=self.new_tokens,
            tau=self.decode_tokens / self.decode_forwards if self.decode_forwards else None,
            acceptance=[a / d if d else None for a, d in zip(self.accepted, self.drafted)],
            target_forwards=self.target_forwards, draft_forwards=self.draft_forwards,
            tokens_per_s=self.new_tokens / self.time_s if self.time_s else None, time_s=self.time_s)


Generation = namedtuple('Generation', 'tokens stats')  # a decoding's new tokens and its Stats


def check_request(prompt, max_new_tokens, temperature, top_k, top_p):
    """One-line errors for a request that cannot mean anything (nan fails every comparison)."""
    for ok, error in ((len(prompt) > 0, "empty prompt: give at least one token (BPE prompts may "
                                        "start with <|endoftext|>)"),
                      (max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}"),
                      (temperature >= 0 and math.isfinite(temperature),
                       f"temperature must be a number >= 0 (0 = greedy), got {temperature}"),
                      (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
                      (0 < top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {top_p}")):
        if not ok:
            raise UserError(error)


class Decoding:
    """A decoding run: the sequence so far, the sampling settings, the stop sequence, Stats and
    timing. A loop runs `while run.running():` steps that end in run.emit(...)."""

    def __init__(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, generator,
                 n_drafts=0):
        check_request(prompt, max_new_tokens, temperature, top_k, top_p)
        self.seq, self.n_prompt, self.max_new_tokens = list(prompt), len(prompt), max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)  # p and q
        self.greedy, self.stop, self.generator = temperature == 0, list(stop), generator
        self.stats, self.stopped = Stats(n_drafts), False
        self.t0 = time.perf_counter()

    def running(self):
        return not self.stopped and self.budget() > 0

    def budget(self):  # how many tokens may still be emitted
        return self.max_new_tokens - (len(self.seq) - self.n_prompt)

    def pick(self, logits):
        """Drafts from draft logits (..., V): (tokens drawn from q, q), q as the target's p."""
        q = probs_from_logits(logits, **self.sampling)
        return draw(q, self.greedy, self.generator), q

    def emit(self, new, n_drafts):
        """Append a step's tokens (accepted drafts, one target token) and count the step; a stop
        sequence now ending among them (and starting after the prompt) is cut: the run ends."""
        self.stats.step(n_drafts, len(new) - 1)
        self.seq += new
        seq, stop = self.seq, self.stop
        for i in range(max(self.n_prompt, len(seq) - len(new) - len(stop) + 1),
                       len(seq) - len(stop) + 1) if stop else ():
            if seq[i:i + len(stop)] == stop:
                del seq[i:]
                self.stopped = True
                return

    def result(self, draft_forwards=0):
        self.stats.new_tokens = len(self.seq) - self.n_prompt
        self.stats.time_s = time.perf_counter() - self.t0
        self.stats.draft_forwards += draft_forwards
        return Generation(self.seq[self.n_prompt:], self.stats)
