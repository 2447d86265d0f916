"""
Sample from a nanoMTP checkpoint: vanilla decoding, self-speculative decoding (the model's own MTP
heads draft) or two-model speculative decoding (a separate, smaller checkpoint drafts).

    python sample.py --ckpt=out/ckpt.pt --prompt="ROMEO:" --max_new_tokens=200
    python sample.py --ckpt=out/ckpt.pt --speculative=true --temperature=0   # heads 2..n draft
    python sample.py --ckpt=out/ckpt.pt --draft=out-small/ckpt.pt --gamma=4  # a draft model

Speculative decoding, exactly. A step feeds the tokens that are not verified yet -- the last
emitted token and k drafts -- through the target model in ONE forward; its next-token head gives
the target distribution p at each of the k+1 positions, `verify` decides which drafts stand (the
output is vanilla greedy decoding token for token, or distributed exactly as vanilla sampling), and
the KV cache is rolled back to the accepted length. Temperature, top-k and top-p shape p and the
drafts' q alike (probs_from_logits). Drafts come from the model's heads 2..n (self-speculative;
sequential heads chain from the token just emitted, each draft from the one before) or a draft
model, one forward each (Leviathan et al. 2023, Chen et al. 2023).

Long sequences (sliding window). A model sees at most block_size positions. When the sequence
outgrows the window, the window jumps to its last `keep` tokens (default 3/4 of block_size), which
are prefilled again. The jumps depend only on the sequence length, so every mode conditions every
token on the same context (greedy outputs stay identical), and a speculative step feeds only as
many drafts as fit before the window's end.

Metrics: common.Stats. Greedy exactness is tested in fp32; under bfloat16 near-ties may differ.
"""
import json
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from model import KVCache
from common import (UserError, flag, parse_flags, DecodeFlags, check_ranges, pick_device,
                    autocast_for, set_cpu_threads, load_model, cli)
from data.text import tokenizer_for, encode_prompt, stop_tokens, check_draft


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
# a model, its KV cache, and the window of the sequence the cache holds

class Window:
    """The cache holds seq[start : start + cache.length] (see "Long sequences" above)."""

    def __init__(self, model, keep=None):
        self.model, self.block_size, self.start = model, model.config.block_size, 0
        self.keep = min(keep or self.block_size - self.block_size // 4, self.block_size)
        self.cache = model.new_cache(self.block_size)
        self.device = next(model.parameters()).device
        if getattr(model.config, 'head_type', None) == 'sequential':  # their own cache (below)
            self.head_cache = KVCache(model.config.n_future - 1, self.block_size)
            self.entry = torch.empty(self.block_size, model.config.n_embd, device=self.device)

    def slide(self, n):
        """Make the window fit a sequence of n tokens; return how many more tokens (drafts) fit."""
        if n - self.start > self.block_size:
            self.start = n - self.keep
            self.cache.rollback(0)
            if hasattr(self, 'head_cache'):
                self.head_cache.rollback(0)
        return self.start + self.block_size - n

    def follow(self, other):
        """Start where another window starts (a draft model mirrors its target's context)."""
        if self.start != other.start:
            self.start = other.start
            self.cache.rollback(0)

    def forward(self, seq, drafts=None, n_heads=None):
        """Logits (T, n_heads, V) of the tokens of seq the cache lacks, followed by drafts (k,)."""
        new = torch.tensor(seq[self.start + self.cache.length:], dtype=torch.long,
                           device=self.device)
        if drafts is not None and drafts.numel():
            new = torch.cat([new, drafts])
        logits, _, self.trunk_hidden = self.model(new[None], cache=self.cache, n_heads=n_heads,
                                                  return_hidden=True)
        if hasattr(self, 'head_cache'):  # keep the sequential chain's input at every position
            end = self.cache.length
            self.entry[end - len(new):end] = self.model.heads[1].mix(self.trunk_hidden)[0]
        return logits[0]

    def draft_logits(self, row):
        """Logits (n_future - 1, V) of heads 2..n at `row` of the last forward, computed from the
        trunk states of that row alone: for heads without attention (resblock) this is all a
        draft needs, so the forward itself can run head 1 only."""
        return self.model.draft_logits([h[0, row] for h in self.trunk_hidden])

    def draft_chain(self, seq, pick):
        """Sequential heads: drafts of x_{t+2}..x_{t+n} and their q, where seq ends with the
        token x_{t+1} just emitted. The heads' cache holds the positions whose inputs were all
        emitted tokens; each step runs the heads over the rest, up to t (MTPGPT.draft_chain),
        then forgets the positions that read a draft."""
        t, n_future = len(seq) - 2 - self.start, self.model.config.n_future  # t: window position
        done = self.head_cache.length
        tokens = torch.tensor(seq[self.start + done + 1:], dtype=torch.long, device=self.device)
        drafts, q = self.model.draft_chain(self.entry[done:t + 1], tokens, pick, self.head_cache)
        self.head_cache.advance(t + 1 - done)
        self.head_cache.rollback(max(0, t + 3 - n_future))  # head n at s reads x_{s+n-1} <= x_{t+1}
        return drafts, q

    def rollback(self, n):
        """Forget the cached tokens from sequence index n on (the rejected drafts)."""
        self.cache.rollback(min(self.cache.length, n - self.start))


# -----------------------------------------------------------------------------
# the decoding loops (their bookkeeping, common.Decoding, sits around them)

@torch.inference_mode()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop=(),
             generator=None, keep=None):
    """Vanilla decoding with the KV cache: one forward of head 1 per token."""
    run = Decoding(prompt, max_new_tokens, temperature, top_k, top_p, stop, generator)
    window = Window(model, keep)
    while run.running():
        window.slide(len(run.seq))
        probs = probs_from_logits(window.forward(run.seq, n_heads=1)[-1, 0], **run.sampling)
        run.emit([int(draw(probs, run.greedy, run.generator))], 0)
    return run.result(window)


@torch.inference_mode()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                   generator=None):
    """Vanilla decoding of a batch: prompts (B, P) of equal length -> (B, P + max_new_tokens).
    For writing corpora (distill.py), so there are no stop sequences, no metrics and no window:
    P + max_new_tokens must fit block_size. Greedy row b is what generate() gives for prompts[b]
    (up to floating-point near-ties, e.g. under bf16); sampled rows match it in distribution."""
    check_request(prompts[0].tolist() if len(prompts) else [], max_new_tokens, temperature,
                  top_k, top_p)
    if prompts.size(1) + max_new_tokens > model.config.block_size:
        raise UserError(f"prompt ({prompts.size(1)}) + max_new_tokens ({max_new_tokens}) exceed "
                        f"block_size {model.config.block_size}")
    cache, tokens = model.new_cache(), [prompts]
    for _ in range(max_new_tokens):
        logits, _ = model(tokens[-1], cache=cache, n_heads=1)
        probs = probs_from_logits(logits[:, -1, 0], temperature, top_k, top_p)
        tokens.append(draw(probs, temperature == 0, generator)[:, None])
    return torch.cat(tokens, dim=1)


@torch.inference_mode()
def generate_self_speculative(model, prompt, max_new_tokens, temperature=1.0, top_k=0,
                              top_p=1.0, stop=(), generator=None, keep=None):
    """Self-speculative decoding: one forward per step; head 1 verifies the previous step's
    drafts, and heads 2..n draft the next n-1 tokens. Parallel heads draft at the last accepted
    position: block heads in the same forward (their KV cache needs every position), resblock
    heads at that one row. Sequential heads draft after the step, from the token just emitted
    (Window.draft_chain), so each draft follows the tokens before it."""
    n_future = model.config.n_future
    if n_future < 2:
        raise UserError("self-speculative decoding needs MTP heads, but this checkpoint has "
                        "n_future=1; decode without --speculative, or give a --draft model")
    run = Decoding(prompt, max_new_tokens, temperature, top_k, top_p, stop, generator, n_future - 1)
    window = Window(model, keep)
    drafts = torch.empty(0, dtype=torch.long, device=window.device)
    q = torch.empty(0, model.config.vocab_size, device=window.device)
    head_type = model.config.head_type
    lazy_heads = head_type != 'block'  # heads without attention, or sequential (own cache)

    def pick(logits):  # a draft and its q, from sequential head logits
        q = probs_from_logits(logits, **run.sampling)
        return draw(q, run.greedy, run.generator), q
    while run.running():
        room = window.slide(len(run.seq))
        # a step emits at most k+1 tokens: never draft past max_new_tokens or the window's end
        k = min(drafts.numel(), room, run.budget() - 1)
        logits = window.forward(run.seq, drafts[:k], n_heads=1 if lazy_heads else None)
        T = logits.size(0)  # the last k+1 rows are the last token and the k drafts
        p = probs_from_logits(logits[T - k - 1:, 0], **run.sampling)
        new = verify(p, drafts[:k], q[:k], run.greedy, run.generator)
        # the cache keeps the last token and the accepted drafts; the free token is fed next step
        window.rollback(len(run.seq) + len(new) - 1)
        run.emit(new, k)
        if head_type == 'sequential':  # heads 2..n chain from the free token just emitted
            drafts, q = window.draft_chain(run.seq, pick) if run.running() else (drafts, q)
            continue
        # at the last accepted position head 1 gave the free token; heads 2..n draft what follows
        row = T - k - 1 + len(new) - 1
        q = probs_from_logits(window.draft_logits(row) if lazy_heads else logits[row, 1:],
                              **run.sampling)
        drafts = draw(q, run.greedy, run.generator)
    return run.result(window)


@torch.inference_mode()
def generate_two_model(target, draft, prompt, max_new_tokens, gamma=4, temperature=1.0, top_k=0,
                       top_p=1.0, stop=(), generator=None, keep=None):
    """Two-model speculative decoding: the draft model drafts gamma tokens autoregressively (its
    own KV cache), the target verifies them in one forward. `keep` applies to the target's window;
    a draft model with a block_size >= the target's uses the target's window, a smaller one its
    own (with its default keep)."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from "
                        f"the target's ({target.config.vocab_size})")
    if gamma < 1:
        raise UserError(f"gamma (drafts per step) must be >= 1, got {gamma}")
    run = Decoding(prompt, max_new_tokens, temperature, top_k, top_p, stop, generator, gamma)
    target_window, draft_window = Window(target, keep), Window(draft)
    while run.running():
        room = target_window.slide(len(run.seq))
        first = run.stats.target_forwards == 0  # as in every mode: the prompt's forward, no drafts
        k = 0 if first else min(gamma, room, run.budget() - 1)
        if draft.config.block_size >= target.config.block_size:
            draft_window.follow(target_window)  # the target's context: a draft equal to the
        drafts, q = [], []                      # target would be accepted every time
        for j in range(k):
            draft_window.slide(len(run.seq) + j)
            logits = draft_window.forward(run.seq + drafts, n_heads=1)[-1, 0]
            q.append(probs_from_logits(logits, **run.sampling))
            drafts.append(int(draw(q[-1], run.greedy, run.generator)))
        run.stats.draft_forwards += k
        drafts = torch.tensor(drafts, dtype=torch.long, device=target_window.device)
        q = torch.stack(q) if q else torch.empty(0, target.config.vocab_size, device=drafts.device)
        logits = target_window.forward(run.seq, drafts, n_heads=1)
        p = probs_from_logits(logits[-k - 1:, 0], **run.sampling)
        new = verify(p, drafts, q, run.greedy, run.generator)
        target_window.rollback(len(run.seq) + len(new) - 1)
        draft_window.rollback(len(run.seq) + len(new) - 1)
        run.emit(new, k)
    return run.result(target_window)


# -----------------------------------------------------------------------------
# command line

@dataclass
class SampleConfig(DecodeFlags):
    """python sample.py --ckpt=out/ckpt.pt [--name=value ...]
Generate text from a checkpoint: vanilla, self-speculative (--speculative) or with a draft model."""
    prompt: str = flag('\n', "the prompt text, or FILE:path; '' = <|endoftext|> (BPE only)")
    num_samples: int = flag(1, "samples to draw, one after another")
    max_new_tokens: int = flag(500, "tokens to generate per sample")
    speculative: bool = flag(False, "self-speculative decoding: the model's heads 2..n draft")
    stop: str = flag('auto', "stop sequence: auto (<|endoftext|> for BPE) | none | a string")
    quiet: bool = flag(False, "print only the metrics and the JSON line")


def decoder(args, model, ckpt, prompt, sampling):
    """(mode name, a function that decodes one sample) for the flags."""
    if args.draft and args.speculative:
        raise UserError("--speculative (the model's own heads) and --draft (a draft model) are "
                        "exclusive: pick one")
    if args.draft:
        draft, draft_ckpt = load_model(args.draft, next(model.parameters()).device)
        check_draft(ckpt, draft_ckpt)
        return 'two-model', lambda: generate_two_model(model, draft, prompt, args.max_new_tokens,
                                                       args.gamma, **sampling)
    if args.speculative:
        return 'self-speculative', lambda: generate_self_speculative(
            model, prompt, args.max_new_tokens, **sampling)
    return 'vanilla', lambda: generate(model, prompt, args.max_new_tokens, **sampling)


def main(argv):
    args = parse_flags(argv, SampleConfig())
    set_cpu_threads(args.threads)
    device = pick_device(args.device)
    autocast = autocast_for(args.dtype, device)  # (checks --dtype before any loading)
    model, ckpt = load_model(args.ckpt, device)
    tokenizer = tokenizer_for(ckpt)  # (a checkpoint without one is a one-line error)
    prompt = encode_prompt(args.prompt, tokenizer)
    check_ranges(args, positive=('num_samples',))
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop=stop_tokens(args.stop, tokenizer),
                    generator=torch.Generator(device).manual_seed(args.seed))
    mode, run = decoder(args, model, ckpt, prompt, sampling)
    samples, stats = [], Stats()
    with autocast:
        for i in range(args.num_samples):
            result = run()
            stats = result.stats if i == 0 else stats.add(result.stats)
            samples.append(tokenizer.decode(result.tokens))
            if not args.quiet:
                print(tokenizer.decode(prompt) + samples[-1] + '\n---------------')
    summary = dict(mode=mode, ckpt=args.ckpt, **stats.summary(), samples=samples)
    tau = 'n/a' if summary['tau'] is None else f"{summary['tau']:.2f}"
    acceptance = ' '.join('-' if a is None else f"{a:.2f}" for a in summary['acceptance'])
    print(f"{mode}: {summary['new_tokens']} tokens in {summary['time_s']:.2f}s "
          f"({summary['tokens_per_s'] or 0:.1f} tokens/s), tau {tau}, target forwards "
          f"{summary['target_forwards']}, draft forwards {summary['draft_forwards']}"
          + (f", acceptance by position {acceptance}" if acceptance else ''))
    print(json.dumps(summary))
    return summary


# PLUMBING-TEMP
# the decoding bookkeeping, out of common.py, until sample.py defines its own (the merge drops
# this block, down to the end mark)
import math  # noqa: E402
import time  # noqa: E402
from collections import namedtuple  # noqa: E402


class Stats:
    """Counters of one or more decoding runs; summary() turns them into the reported metrics:
    tau = tokens emitted per target forward (accepted drafts + the free/bonus token) over the
    decode forwards (a run's first forward prefills the prompt and is left out, so vanilla has
    tau = 1, perfect drafts n_future, resp. gamma + 1); acceptance[j] = P(draft j+1 accepted |
    drafts 1..j accepted); tokens/s."""

    def __init__(self, n_draft_positions=0):
        self.new_tokens = 0        # tokens returned (a stop sequence cut off)
        self.target_forwards = 0   # every forward of the target, prefills included
        self.draft_forwards = 0    # forwards of a separate draft model
        self.decode_forwards = 0   # target forwards after each run's first (prompt) forward
        self.decode_tokens = 0     # tokens those emitted: accepted drafts + the free token
        self.drafted = [0] * n_draft_positions   # [j]: draft j+1 verified after j accepted ones
        self.accepted = [0] * n_draft_positions  # [j]: ... and accepted
        self.time_s = 0.0

    def step(self, n_drafts, n_accepted):
        """Count one target forward that verified n_drafts drafts and accepted n_accepted."""
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
            setattr(self, name, [a + b for a, b in zip(mine, theirs)] if isinstance(mine, list)
                    else mine + theirs)
        return self

    def summary(self):
        return dict(
            new_tokens=self.new_tokens,
            tau=self.decode_tokens / self.decode_forwards if self.decode_forwards else None,
            acceptance=[a / d if d else None for a, d in zip(self.accepted, self.drafted)],
            target_forwards=self.target_forwards, draft_forwards=self.draft_forwards,
            tokens_per_s=self.new_tokens / self.time_s if self.time_s else None, time_s=self.time_s)


# a decoding's result: the new tokens, its Stats, and the target's Window (KV cache) at the end
Generation = namedtuple('Generation', 'tokens stats window')


def check_request(prompt, max_new_tokens, temperature, top_k, top_p):
    if len(prompt) == 0:
        raise UserError("empty prompt: give at least one token (BPE prompts may start with "
                        "<|endoftext|>)")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):  # (nan fails >= 0)
        raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


class Decoding:
    """The bookkeeping around a decoding loop (sample.py), so the loop holds only the idea: the
    request's checks, the sequence so far, the sampling settings, the stop sequence, Stats and
    timing. A loop runs `while d.running():` steps that end in `d.emit(new_tokens, n_drafts)`."""

    def __init__(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, generator,
                 n_draft_positions=0):
        check_request(prompt, max_new_tokens, temperature, top_k, top_p)
        self.seq, self.n_prompt, self.max_new_tokens = list(prompt), len(prompt), max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)  # p and q
        self.greedy, self.stop, self.generator = temperature == 0, list(stop), generator
        self.stats, self.stopped = Stats(n_draft_positions), False
        self.t0 = time.perf_counter()

    def running(self):
        return not self.stopped and self.budget() > 0

    def budget(self):
        """How many tokens may still be emitted."""
        return self.max_new_tokens - (len(self.seq) - self.n_prompt)

    def emit(self, new, n_drafts):
        """Append a step's tokens (its accepted drafts and one target token); count the step. A stop
        sequence now ending among them (and starting after the prompt) is cut, ending the run."""
        self.stats.step(n_drafts, len(new) - 1)
        self.seq += new
        seq, stop = self.seq, self.stop
        for i in range(max(self.n_prompt, len(seq) - len(new) - len(stop) + 1),
                       len(seq) - len(stop) + 1) if stop else ():
            if seq[i:i + len(stop)] == stop:
                del seq[i:]
                self.stopped = True
                return

    def result(self, window):
        self.stats.new_tokens = len(self.seq) - self.n_prompt
        self.stats.time_s = time.perf_counter() - self.t0
        return Generation(self.seq[self.n_prompt:], self.stats, window)


# PLUMBING-TEMP end


if __name__ == '__main__':
    cli(main)
