"""
Sample from a nanoMTP checkpoint: vanilla decoding, self-speculative decoding (the model's own MTP
heads draft) or two-model speculative decoding (a separate, smaller checkpoint drafts).

    python sample.py --ckpt=out/ckpt.pt --prompt="ROMEO:" --max_new_tokens=200
    python sample.py --ckpt=out/ckpt.pt --speculative=true --temperature=0   # heads 2..n draft
    python sample.py --ckpt=out/ckpt.pt --draft=out-small/ckpt.pt --gamma=4  # a draft model
    python sample.py --ckpt=out/ckpt.pt --prompt=FILE:prompt.txt --top_k=50 --top_p=0.9

Flags (--name=value): ckpt, prompt (a string or FILE:path), num_samples, max_new_tokens,
temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed, speculative, draft, gamma,
stop, device, dtype, threads (CPU threads; 0 = torch's default, 1 is fastest for small
models), quiet. Every run prints its metrics and then a JSON summary as the last line.

Speculative decoding, exactly. A step feeds the tokens that are not
verified yet -- the last emitted token and k drafts -- through the target model in ONE forward;
its next-token head gives the target distribution p at each of the k+1 positions, and `verify`
decides which drafts stand:
  temperature 0:  accept the longest draft prefix equal to the target's argmax, plus the target's
                  argmax after it (the free token). The output is token for token vanilla greedy.
  temperature >0: accept draft x ~ q with probability min(1, p(x)/q(x)); at the first rejection
                  draw from norm(max(0, p - q)) and stop; if all are accepted draw a bonus token
                  from p. Every token is distributed exactly as vanilla sampling's (lossless).
Temperature, top-k and top-p shape p and q alike, through one function (probs_from_logits).
After a rejection the KV cache is rolled back to the accepted length.
  self-speculative: heads 2..n of the SAME forward, read at the last accepted position, draft the
                  n-1 tokens after the free token, so each step is exactly one forward (of all
                  heads: every block head's cache layers must stay in step; linear heads, which
                  attend to nothing, run on that one row only). Needs n_future >= 2: a
                  1-head checkpoint with --speculative is an error, not a silent fallback.
  two-model:      the draft model (its own KV cache, rolled back too) drafts gamma tokens one
                  forward at a time, the target verifies them in one forward (Leviathan et al.
                  2023, Chen et al. 2023). Draft and target must share the tokenizer.

Better drafts. Heads trained on a corpus predict the data; drafts are judged against the model's
own next tokens. distill.py fine-tunes heads 2..n on the model's own generations (trunk and head 1
untouched, so every output distribution here is unchanged): greedy tau 1.92 -> 2.94 (README).

Prompts and stops. An empty prompt is an error for char models (there is no start token); BPE
models start from <|endoftext|>, GPT-2's document separator. Generation stops after
max_new_tokens or at the stop sequence, which is cut from the output: --stop=auto (default) is
<|endoftext|> for BPE and nothing for char models, --stop=none disables it, any other string is
matched as a token sequence (\\n and \\t are unescaped).

Long sequences (sliding window). A model sees at most block_size positions. Each model keeps one
window start s: its cache holds seq[s:]. When the sequence outgrows the window (len(seq) - s >
block_size) the window jumps to the last `keep` tokens (default 3/4 of block_size) and they are
prefilled again. The jumps depend only on the sequence length, so vanilla and speculative decoding
condition every token on the same context (greedy outputs stay identical), and a speculative step
feeds only as many drafts as fit before the window's end.

Metrics. tau = tokens emitted per target forward, free/bonus token
included, counted over the decode forwards: the first forward, which prefills the prompt and
emits one token in every mode, is left out (so vanilla has tau = 1 and perfect drafts give
tau = n_future, resp. gamma + 1). acceptance[j] = P(draft j+1 accepted | drafts 1..j accepted).

Precision. Greedy exactness is tested in fp32. Under --dtype=bfloat16 a chunk of k+1 tokens and
single tokens are computed with different rounding, so near-ties may break differently
(bench.py reports whether the greedy outputs were identical).
"""
import json
import os
import sys
import time

import torch
from torch.nn import functional as F

from model import UserError, parse_flags, pick_device, autocast_for, set_cpu_threads
from heads import load_model, tokenizer_for


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
    logits = logits / temperature
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
        self.model = model
        self.block_size = model.config.block_size
        self.keep = min(keep or self.block_size - self.block_size // 4, self.block_size)
        self.cache = model.new_cache(self.block_size)
        self.start = 0
        self.device = next(model.parameters()).device

    def slide(self, n):
        """Make the window fit a sequence of n tokens; return how many more tokens (drafts) fit."""
        if n - self.start > self.block_size:
            self.start = n - self.keep
            self.cache.rollback(0)
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
        return logits[0]

    def draft_logits(self, row):
        """Logits (n_future - 1, V) of heads 2..n at `row` of the last forward, computed from the
        trunk states of that row alone: for heads without attention (linear) this is all a
        draft needs, so the forward itself can run head 1 only."""
        return self.model.draft_logits([h[0, row] for h in self.trunk_hidden])

    def rollback(self, n):
        """Forget the cached tokens from sequence index n on (the rejected drafts)."""
        self.cache.rollback(min(self.cache.length, n - self.start))


# -----------------------------------------------------------------------------
# metrics

class Stats:
    """Counters of one or more runs; summary() turns them into the reported metrics."""

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
        for name in ('new_tokens', 'target_forwards', 'draft_forwards', 'decode_forwards',
                     'decode_tokens', 'time_s'):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.drafted = [a + b for a, b in zip(self.drafted, other.drafted)]
        self.accepted = [a + b for a, b in zip(self.accepted, other.accepted)]
        return self

    def summary(self):
        return dict(
            new_tokens=self.new_tokens,
            tau=self.decode_tokens / self.decode_forwards if self.decode_forwards else None,
            acceptance=[a / d if d else None for a, d in zip(self.accepted, self.drafted)],
            target_forwards=self.target_forwards, draft_forwards=self.draft_forwards,
            tokens_per_s=self.new_tokens / self.time_s if self.time_s else None,
            time_s=self.time_s)


class Generation:
    """tokens: the new tokens; stats: a Stats; window: the target's cache at the end."""

    def __init__(self, tokens, stats, window):
        self.tokens, self.stats, self.window = tokens, stats, window


# -----------------------------------------------------------------------------
# decoding

def check_request(prompt, max_new_tokens, temperature, top_k, top_p):
    if len(prompt) == 0:
        raise UserError("empty prompt: give at least one token (BPE prompts may start with "
                        "<|endoftext|>)")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def stop_index(seq, stop, first, n_new):
    """Where the stop sequence starts in seq, if it ends among the last n_new tokens and starts
    at index >= first (after the prompt); else None."""
    if not stop:
        return None
    lo = max(first, len(seq) - n_new - len(stop) + 1)
    for i in range(lo, len(seq) - len(stop) + 1):
        if seq[i:i + len(stop)] == stop:
            return i
    return None


def finish(seq, n_prompt, stop, n_new):
    """After n_new tokens were appended: cut a completed stop sequence; True if generation ends."""
    i = stop_index(seq, stop, n_prompt, n_new)
    if i is not None:
        del seq[i:]
    return i is not None


@torch.inference_mode()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop=(),
             generator=None, keep=None):
    """Vanilla decoding with the KV cache: one forward of head 1 per token."""
    check_request(prompt, max_new_tokens, temperature, top_k, top_p)
    greedy, stop = temperature == 0, list(stop)
    t0, stats = time.perf_counter(), Stats()
    seq, n_prompt = list(prompt), len(prompt)
    window = Window(model, keep)
    while len(seq) - n_prompt < max_new_tokens:
        window.slide(len(seq))
        logits = window.forward(seq, n_heads=1)[-1, 0]
        probs = probs_from_logits(logits, temperature, top_k, top_p)
        seq.append(int(draw(probs, greedy, generator)))
        stats.step(0, 0)
        if finish(seq, n_prompt, stop, 1):
            break
    stats.new_tokens, stats.time_s = len(seq) - n_prompt, time.perf_counter() - t0
    return Generation(seq[n_prompt:], stats, window)


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
    cache = model.new_cache()
    tokens = [prompts]
    for _ in range(max_new_tokens):
        logits, _ = model(tokens[-1], cache=cache, n_heads=1)
        probs = probs_from_logits(logits[:, -1, 0], temperature, top_k, top_p)
        tokens.append(draw(probs, temperature == 0, generator)[:, None])
    return torch.cat(tokens, dim=1)


@torch.inference_mode()
def generate_self_speculative(model, prompt, max_new_tokens, temperature=1.0, top_k=0,
                              top_p=1.0, stop=(), generator=None, keep=None):
    """Self-speculative decoding: one forward of all heads per step; head 1 verifies the previous
    step's drafts, heads 2..n at the last accepted position draft the next n-1 tokens. Heads
    with blocks must see every position (their KV cache); linear heads run at that one row."""
    n_future = model.config.n_future
    if n_future < 2:
        raise UserError("self-speculative decoding needs MTP heads, but this checkpoint has "
                        "n_future=1; decode without --speculative, or give a --draft model")
    check_request(prompt, max_new_tokens, temperature, top_k, top_p)
    greedy, stop = temperature == 0, list(stop)
    t0, stats = time.perf_counter(), Stats(n_future - 1)
    seq, n_prompt = list(prompt), len(prompt)
    window = Window(model, keep)
    drafts = torch.empty(0, dtype=torch.long, device=window.device)
    q = torch.empty(0, model.config.vocab_size, device=window.device)
    lazy_heads = model.config.head_type == 'linear'
    while len(seq) - n_prompt < max_new_tokens:
        room = window.slide(len(seq))
        # a step emits at most k+1 tokens: never draft past max_new_tokens or the window's end
        k = min(drafts.numel(), room, max_new_tokens - (len(seq) - n_prompt) - 1)
        logits = window.forward(seq, drafts[:k], n_heads=1 if lazy_heads else None)
        T = logits.size(0)  # the last k+1 rows are the last token and the k drafts
        p = probs_from_logits(logits[T - k - 1:, 0], temperature, top_k, top_p)
        new = verify(p, drafts[:k], q[:k], greedy, generator)
        n_accepted = len(new) - 1
        stats.step(k, n_accepted)
        # the cache keeps the last token and the accepted drafts; the free token is fed next step
        window.rollback(len(seq) + n_accepted)
        # at the last accepted position head 1 gave the free token; heads 2..n draft what follows
        row = T - k - 1 + n_accepted
        q = probs_from_logits(window.draft_logits(row) if lazy_heads else logits[row, 1:],
                              temperature, top_k, top_p)
        drafts = draw(q, greedy, generator)
        seq += new
        if finish(seq, n_prompt, stop, len(new)):
            break
    stats.new_tokens, stats.time_s = len(seq) - n_prompt, time.perf_counter() - t0
    return Generation(seq[n_prompt:], stats, window)


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
    check_request(prompt, max_new_tokens, temperature, top_k, top_p)
    greedy, stop = temperature == 0, list(stop)
    t0, stats = time.perf_counter(), Stats(gamma)
    seq, n_prompt = list(prompt), len(prompt)
    target_window, draft_window = Window(target, keep), Window(draft)
    while len(seq) - n_prompt < max_new_tokens:
        room = target_window.slide(len(seq))
        first = stats.target_forwards == 0   # as in every mode, the prompt's forward has no drafts
        k = 0 if first else min(gamma, room, max_new_tokens - (len(seq) - n_prompt) - 1)
        if draft.config.block_size >= target.config.block_size:
            draft_window.follow(target_window)   # same context as the target: draft == target
        drafts, q = [], []                       # would accept everything
        for j in range(k):
            draft_window.slide(len(seq) + j)
            logits = draft_window.forward(seq + drafts, n_heads=1)[-1, 0]
            q.append(probs_from_logits(logits, temperature, top_k, top_p))
            drafts.append(int(draw(q[-1], greedy, generator)))
        stats.draft_forwards += k
        drafts = torch.tensor(drafts, dtype=torch.long, device=target_window.device)
        q = torch.stack(q) if q else torch.empty(0, target.config.vocab_size,
                                                 device=drafts.device)
        logits = target_window.forward(seq, drafts, n_heads=1)
        p = probs_from_logits(logits[-k - 1:, 0], temperature, top_k, top_p)
        new = verify(p, drafts, q, greedy, generator)
        stats.step(k, len(new) - 1)
        target_window.rollback(len(seq) + len(new) - 1)
        draft_window.rollback(len(seq) + len(new) - 1)
        seq += new
        if finish(seq, n_prompt, stop, len(new)):
            break
    stats.new_tokens, stats.time_s = len(seq) - n_prompt, time.perf_counter() - t0
    return Generation(seq[n_prompt:], stats, target_window)


# -----------------------------------------------------------------------------
# command line

FLAGS = dict(ckpt='out/ckpt.pt', prompt='\n', num_samples=1, max_new_tokens=500, temperature=0.8,
             top_k=0, top_p=1.0, seed=1337, speculative=False, draft='', gamma=4, stop='auto',
             device='auto', dtype='auto', threads=0, quiet=False)


def encode_prompt(text, tokenizer):
    """Token ids of a prompt string or FILE:path; empty: <|endoftext|> (BPE) or an error (char)."""
    if text.startswith('FILE:'):
        path = text[len('FILE:'):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file not found: {path}")
        with open(path, encoding='utf-8') as f:
            text = f.read()
    if not text:
        if tokenizer.eot is None:
            raise UserError("empty prompt: a char model has no start token; give at least one "
                            "character (--prompt=...)")
        return [tokenizer.eot]
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise UserError(f"prompt: {e}")


def stop_tokens(flag, tokenizer):
    """--stop: auto (<|endoftext|> for BPE, none for char) | none | a string."""
    if flag == 'auto':
        return [] if tokenizer.eot is None else [tokenizer.eot]
    if flag in ('none', ''):
        return []
    try:
        return tokenizer.encode(flag.replace('\\n', '\n').replace('\\t', '\t'))
    except ValueError as e:
        raise UserError(f"stop: {e}")


def load_for_sampling(path, device):
    model, ckpt = load_model(path, device)
    if not ckpt.get('meta'):
        raise UserError(f"{path} has no tokenizer metadata (meta); cannot encode prompts")
    return model, ckpt


def main(argv):
    args = parse_flags(argv, FLAGS)
    set_cpu_threads(args['threads'])
    device = pick_device(args['device'])
    autocast = autocast_for(args['dtype'], device)
    model, ckpt = load_for_sampling(args['ckpt'], device)
    tokenizer = tokenizer_for(ckpt)
    prompt = encode_prompt(args['prompt'], tokenizer)
    stop = stop_tokens(args['stop'], tokenizer)
    if args['num_samples'] < 1:
        raise UserError(f"num_samples must be >= 1, got {args['num_samples']}")
    if args['draft'] and args['speculative']:
        raise UserError("--speculative (the model's own heads) and --draft (a draft model) are "
                        "exclusive: pick one")
    sampling = dict(temperature=args['temperature'], top_k=args['top_k'], top_p=args['top_p'],
                    stop=stop, generator=torch.Generator(device).manual_seed(args['seed']))
    if args['draft']:
        mode = 'two-model'
        draft, draft_ckpt = load_for_sampling(args['draft'], device)
        if draft_ckpt['meta'] != ckpt['meta']:
            raise UserError("the draft checkpoint's tokenizer differs from the target's")
        run = lambda: generate_two_model(model, draft, prompt, args['max_new_tokens'],
                                         args['gamma'], **sampling)
    elif args['speculative']:
        mode = 'self-speculative'
        run = lambda: generate_self_speculative(model, prompt, args['max_new_tokens'], **sampling)
    else:
        mode = 'vanilla'
        run = lambda: generate(model, prompt, args['max_new_tokens'], **sampling)
    samples, stats = [], None
    with autocast:
        for _ in range(args['num_samples']):
            result = run()
            stats = result.stats if stats is None else stats.add(result.stats)
            samples.append(tokenizer.decode(result.tokens))
            if not args['quiet']:
                print(tokenizer.decode(prompt) + samples[-1])
                print('---------------')
    summary = dict(mode=mode, ckpt=args['ckpt'], **stats.summary(), samples=samples)
    tau = 'n/a' if summary['tau'] is None else f"{summary['tau']:.2f}"
    acceptance = ' '.join('-' if a is None else f"{a:.2f}" for a in summary['acceptance'])
    print(f"{mode}: {summary['new_tokens']} tokens in {summary['time_s']:.2f}s "
          f"({summary['tokens_per_s'] or 0:.1f} tokens/s), tau {tau}, target forwards "
          f"{summary['target_forwards']}, draft forwards {summary['draft_forwards']}"
          + (f", acceptance by position {acceptance}" if acceptance else ''))
    print(json.dumps(summary))
    return summary


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
