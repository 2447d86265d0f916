"""
Sample from a nanoMTP checkpoint: vanilla decoding, self-speculative decoding (the model's own MTP
heads draft) or two-model speculative decoding (a separate, smaller checkpoint drafts).

    python sample.py --ckpt=out/ckpt.pt --prompt="ROMEO:" --max_new_tokens=200
    python sample.py --ckpt=out/ckpt.pt --speculative=true --temperature=0   # heads 2..n draft
    python sample.py --ckpt=out/ckpt.pt --draft=out-small/ckpt.pt --gamma=4  # a draft model
    python sample.py --ckpt=out/ckpt.pt --prompts=FILE --batch_size=8        # batched

Speculative decoding, exactly (Leviathan et al. 2023, Chen et al. 2023): a step feeds the last
emitted token and k drafts through the target in ONE forward, `verify` decides which drafts stand
against the target's p at the k+1 positions, and the KV cache is rolled back to the accepted
length. The output is vanilla greedy decoding token for token, or distributed exactly as vanilla
sampling (tested in fp32; under bfloat16 near-ties may differ). Who drafts is a drafter
(drafters.py): the model's own heads, or a separate draft model. generate_batch runs the same
loop over many prompts at once (batched.py: the ragged rows' bookkeeping).

Long sequences: a model sees at most block_size positions. A sequence that outgrows the window
jumps to its last `keep` tokens (default 3/4 of block_size), prefilled again; the jumps depend
only on the length, so every mode conditions every token on the same context.
"""
import json
import math
import time
from collections import namedtuple
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn import functional as F

from common import (UserError, flag, parse_flags, DecodeFlags, check_ranges, pick_device,
                    autocast_for, set_cpu_threads, load_model, cli)
from data.text import (tokenizer_for, encode_prompt, read_text, stop_tokens, check_draft,
                       frequent_tokens)
from drafters import DraftVocab, ModelDrafter, heads_drafter
from batched import Batch, NoDrafts, self_drafter, model_drafter


# -----------------------------------------------------------------------------
# the distribution tokens are drawn from, and the acceptance rule

def probs_from_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (..., V) -> the probabilities tokens are drawn from: softmax(logits / temperature),
    restricted to the top_k most probable tokens (0: all), then to the smallest set of most probable
    tokens whose mass reaches top_p (1: all), renormalized. temperature 0 (greedy) gives a one-hot
    at the argmax. Vanilla sampling, the drafts' q and the target's p all come from here: the
    speculative output is distributed exactly as sampling from this function's output."""
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
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
    """One token per row of probs (..., V): the argmax when greedy, else a sample."""
    if greedy:
        return probs.argmax(-1)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


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
    return drafts[:n_accepted].tolist() + torch.multinomial(last, 1, generator=generator).tolist()


# -----------------------------------------------------------------------------
# a decoding loop's bookkeeping, its window of the sequence, and the loops

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
        self.stats.time_s, self.stats.draft_forwards = time.perf_counter() - self.t0, draft_forwards
        return Generation(self.seq[self.n_prompt:], self.stats)


class Window:
    """The cache holds seq[start : start + cache.length] (see "Long sequences" above)."""

    def __init__(self, model, keep=None):
        self.model, self.block_size, self.start = model, model.config.block_size, 0
        self.keep = min(keep or self.block_size - self.block_size // 4, self.block_size)
        self.cache, self.trunk_hidden = model.new_cache(), []
        self.device = model.lm_head.weight.device

    def slide(self, n):
        """Make the window fit a sequence of n tokens; return how many more tokens (drafts) fit."""
        if n - self.start > self.block_size:
            self.start = n - self.keep
            self.cache.rollback(0)
        return self.start + self.block_size - n

    def forward(self, seq, drafts=None):
        """Next-token logits (T, V) of the tokens of seq the cache lacks, then of drafts (k,)."""
        tokens = seq[self.start + self.cache.length:] + ([] if drafts is None else drafts.tolist())
        new = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.first = self.cache.length  # the window position of the first new token
        logits, _, self.trunk_hidden = self.model(new[None], cache=self.cache, n_heads=1,
                                                  return_hidden=True)
        return logits[0, :, 0]

    def rollback(self, n):
        """Forget the cached tokens from sequence index n on (the rejected drafts); return the
        last forward's trunk states [h_0 .. h_attach] (1, m, C) at the positions kept."""
        self.cache.rollback(min(self.cache.length, n - self.start))
        return [h[:, :self.cache.length - self.first] for h in self.trunk_hidden]


@torch.inference_mode()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop=(),
             generator=None, keep=None):
    """Vanilla decoding with the KV cache: one forward of head 1 per token."""
    run = Decoding(prompt, max_new_tokens, temperature, top_k, top_p, stop, generator)
    window = Window(model, keep)
    while run.running():
        window.slide(len(run.seq))
        probs = probs_from_logits(window.forward(run.seq)[-1], **run.sampling)
        run.emit([int(draw(probs, run.greedy, run.generator))], 0)
    return run.result()


@torch.inference_mode()
def generate_speculative(model, make_drafter, n_drafts, prompt, max_new_tokens, temperature=1.0,
                         top_k=0, top_p=1.0, stop=(), generator=None, keep=None):
    """Speculative decoding: draft, verify, roll back, emit. make_drafter(window, pick) gives
    what drafts (up to n_drafts tokens a step): the model's own heads or a draft model."""
    run = Decoding(prompt, max_new_tokens, temperature, top_k, top_p, stop, generator, n_drafts)
    window = Window(model, keep)
    drafter = make_drafter(window, run.pick)
    while run.running():
        room = window.slide(len(run.seq))
        # a step emits at most k+1 tokens: never draft past max_new_tokens or the window's end
        drafts, q = drafter.draft(run.seq, min(n_drafts, room, run.budget() - 1))
        logits = window.forward(run.seq, drafts)  # the last k+1 rows: the last token, the drafts
        p = probs_from_logits(logits[len(logits) - len(drafts) - 1:], **run.sampling)
        new = verify(p, drafts, q, run.greedy, run.generator)
        # the cache keeps the last token and the accepted drafts; the free token is fed next step
        verified = window.rollback(len(run.seq) + len(new) - 1)
        run.emit(new, len(drafts))
        if run.running():
            drafter.observe(run.seq, verified, window.start)
    return run.result(drafter.forwards)


@torch.inference_mode()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                   stop=(), generator=None, make_drafter=None, n_drafts=0):
    """Batched decoding: the loop above for a list of prompts at once, each row exactly what it
    gives the prompt alone. The rows go ragged (batched.py names the bookkeeping). make_drafter
    (runs, pick) drafts up to n_drafts tokens per row (batched.self_drafter, model_drafter;
    None: vanilla). max_new_tokens: one for all, or one per prompt. -> a Generation per prompt"""
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else \
        [max_new_tokens] * len(prompts)
    runs = [Decoding(prompt, budget, temperature, top_k, top_p, stop, generator, n_drafts)
            for prompt, budget in zip(prompts, budgets)]
    live = [run for run in runs if run.running()]  # the batch's rows, in cache order
    batch = Batch(model, live, n_drafts)  # (refuses rows that do not fit the window)
    drafter = make_drafter(live, runs[0].pick) if make_drafter and live else NoDrafts(model)
    while live:
        drafts = drafter.draft(live, [min(n_drafts, run.budget() - 1) for run in live])
        feeds = [run.seq[n:] + d.tolist() for run, n, (d, _) in zip(live, batch.lengths(), drafts)]
        logits, trunk_hidden = batch.forward(feeds)  # (B, T, V): each row's feed, padded
        p_all = probs_from_logits(logits, **runs[0].sampling)  # (every row's settings)
        verified, last = [], []  # per row: the tokens its cache keeps; its last one's feed index
        for b, (run, feed, (d, q)) in enumerate(zip(live, feeds, drafts)):
            p = p_all[b, len(feed) - len(d) - 1:len(feed)]  # the last k+1 rows of its feed
            new = verify(p, d, q, run.greedy, run.generator)
            verified.append(len(run.seq) + len(new) - 1)  # the free token is fed next step
            last.append(len(feed) - len(d) - 2 + len(new))
            run.emit(new, len(d))
        rows = [b for b, run in enumerate(live) if run.running()]  # finished rows leave
        batch.rollback(verified, rows)
        drafter.keep(rows)
        live = [live[b] for b in rows]
        if live:
            drafter.observe(live, [h[rows] for h in trunk_hidden], [last[b] for b in rows])
    return [run.result(drafter.forwards) for run in runs]


def generate_self_speculative(model, prompt, max_new_tokens, draft_vocab=None, **sampling):
    """Self-speculative decoding: the model's heads 2..n draft (its design's drafter), from the
    token ids draft_vocab only if given (drafters.DraftVocab)."""
    return generate_speculative(
        model, lambda window, pick: heads_drafter(model, DraftVocab(model, pick, draft_vocab)),
        model.config.n_future - 1, prompt, max_new_tokens, **sampling)


def generate_two_model(target, draft, prompt, max_new_tokens, gamma=4, **sampling):
    """Two-model speculative decoding: a smaller model drafts gamma tokens a step."""
    check_two_model(target, draft, gamma)
    return generate_speculative(target, lambda window, pick: ModelDrafter(Window(draft), window,
                                                                          pick),
                                gamma, prompt, max_new_tokens, **sampling)


def check_two_model(target, draft, gamma):
    if target.config.vocab_size != draft.config.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from "
                        f"the target's ({target.config.vocab_size})")
    if gamma < 1:
        raise UserError(f"gamma (drafts per step) must be >= 1, got {gamma}")


# -----------------------------------------------------------------------------
# command line

@dataclass
class SampleConfig(DecodeFlags):
    """python sample.py --ckpt=out/ckpt.pt [--name=value ...]
Generate text from a checkpoint: vanilla, self-speculative (--speculative) or with a draft model."""
    prompt: str = flag('\n', "the prompt text, or FILE:path; '' = <|endoftext|> (BPE only)")
    prompts: str = flag('', "a file of prompts, one per line (\\n in a line: a newline), decoded "
                            "--batch_size at a time (batched.py); samples in the file's order")
    batch_size: int = flag(8, "with --prompts: how many prompts are decoded at once")
    num_samples: int = flag(1, "samples to draw, one after another (without --prompts)")
    max_new_tokens: int = flag(500, "tokens to generate per sample")
    speculative: bool = flag(False, "self-speculative decoding: the model's heads 2..n draft")
    stop: str = flag('auto', "stop sequence: auto (<|endoftext|> for BPE) | none | a string")
    quiet: bool = flag(False, "print only the metrics and the JSON line")


def main(argv):
    args = parse_flags(argv, SampleConfig())
    set_cpu_threads(args.threads)
    device = pick_device(args.device)
    autocast = autocast_for(args.dtype, device)  # (checks --dtype before any loading)
    model, ckpt = load_model(args.ckpt, device)
    tokenizer = tokenizer_for(ckpt)  # (a checkpoint without one is a one-line error)
    texts = [line.replace('\\n', '\n') for line in read_text(args.prompts, 'prompts file')
             .splitlines()] if args.prompts else [args.prompt] * args.num_samples
    prompts = [encode_prompt(text, tokenizer) for text in texts]
    if not prompts:
        raise UserError(f"no prompts in {args.prompts}: give one per line")
    check_ranges(args, positive=('num_samples', 'batch_size'), non_negative=('draft_vocab',))
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop=stop_tokens(args.stop, tokenizer),
                    generator=torch.Generator(device).manual_seed(args.seed))
    if args.draft and args.speculative:
        raise UserError("--speculative (the model's own heads) and --draft (a draft model) are "
                        "exclusive: pick one")
    mode, decode, drafting = 'vanilla', partial(generate, model), {}
    if args.speculative:
        vocab = frequent_tokens(ckpt, args.draft_vocab) if args.draft_vocab else None
        mode, decode = 'self-speculative', partial(generate_self_speculative, model,
                                                   draft_vocab=vocab)
        drafting = dict(make_drafter=self_drafter(model, vocab),
                        n_drafts=model.config.n_future - 1)
    if args.draft:
        draft, draft_ckpt = load_model(args.draft, device)
        check_draft(ckpt, draft_ckpt)
        check_two_model(model, draft, args.gamma)
        mode, decode = 'two-model', partial(generate_two_model, model, draft, gamma=args.gamma)
        drafting = dict(make_drafter=model_drafter(draft, args.gamma), n_drafts=args.gamma)
    t0 = time.perf_counter()
    with autocast:
        results = [row for i in range(0, len(prompts), args.batch_size) for row in generate_batch(
            model, prompts[i:i + args.batch_size], args.max_new_tokens, **sampling, **drafting)] \
            if args.prompts else [decode(prompt, args.max_new_tokens, **sampling)
                                  for prompt in prompts]
    samples, stats = [tokenizer.decode(result.tokens) for result in results], results[0].stats
    for result in results[1:]:
        stats.add(result.stats)
    for prompt, sample in zip(prompts, samples if not args.quiet else ()):
        print(tokenizer.decode(prompt) + sample + '\n---------------')
    if args.prompts:  # a batch's rows share its time: tokens/s of the whole run
        stats.time_s = time.perf_counter() - t0
    summary = dict(mode=mode, ckpt=args.ckpt, **stats.summary(), samples=samples)
    print(f"{mode}: {summary['new_tokens']} tokens in {summary['time_s']:.2f}s, tau "
          f"{summary['tau'] or 'n/a'}, acceptance by position {summary['acceptance']}")
    print(json.dumps(summary))
    return summary


if __name__ == '__main__':
    cli(main)
