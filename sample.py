"""
Sample from a nanoMTP checkpoint: vanilla decoding, self-speculative decoding (the model's own MTP
heads draft) or two-model speculative decoding (a separate, smaller checkpoint drafts).

    python sample.py --ckpt=out/ckpt.pt --prompt="ROMEO:" --max_new_tokens=200
    python sample.py --ckpt=out/ckpt.pt --speculative=true --temperature=0   # heads 2..n draft
    python sample.py --ckpt=out/ckpt.pt --draft=out-small/ckpt.pt --gamma=4  # a draft model
    python sample.py --ckpt=out/ckpt.pt --prompts=FILE --batch_size=8        # batched

Speculative decoding, exactly (Leviathan et al. 2023, Chen et al. 2023): a step feeds the last
emitted token and k drafts through the target in ONE forward, `verify` (decoding.py) decides
which drafts stand against the target's p at the k+1 positions, and the KV cache is rolled back
to the accepted length. The output is vanilla greedy decoding token for token, or distributed
exactly as vanilla sampling (tested in fp32; under bfloat16 near-ties may differ). Who drafts is
a drafter (drafters.py): the model's own heads, or a separate draft model.
batched.generate_batch runs the same loop over many prompts at once.

Long sequences: a model sees at most block_size positions. A sequence that outgrows the window
jumps to its last `keep` tokens (default 3/4 of block_size), prefilled again; the jumps depend
only on the length, so every mode conditions every token on the same context.
"""
import json
import time
from dataclasses import dataclass
from functools import partial

import torch

from common import (UserError, flag, parse_flags, DecodeFlags, check_ranges, pick_device,
                    autocast_for, set_cpu_threads, load_model, cli)
from data.text import (tokenizer_for, encode_prompt, read_text, stop_tokens, check_draft,
                       frequent_tokens)
from decoding import Decoding, probs_from_logits, draw, verify
from drafters import DraftVocab, ModelDrafter, heads_drafter
from batched import generate_batch, self_drafter, model_drafter


# -----------------------------------------------------------------------------
# the window of the sequence, and the loops

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


def generate_self_speculative(model, prompt, max_new_tokens, draft_vocab=None, **sampling):
    """Self-speculative decoding: the model's heads 2..n draft (its design's drafter), from the
    token ids draft_vocab only if given (drafters.DraftVocab)."""
    return generate_speculative(
        model, lambda window, pick: heads_drafter(model, DraftVocab(model, pick, draft_vocab)),
        model.config.n_future - 1, prompt, max_new_tokens, **sampling)


def generate_two_model(target, draft, prompt, max_new_tokens, gamma=4, **sampling):
    """Two-model speculative decoding: a smaller model drafts gamma tokens a step."""
    check_two_model(target, draft, gamma)
    return generate_speculative(
        target, lambda window, pick: ModelDrafter(Window(draft), window, pick), gamma, prompt,
        max_new_tokens, **sampling)


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
    if not -2 ** 63 <= args.seed < 2 ** 64:  # (what torch's generators take)
        raise UserError(f"seed must be in -2**63 .. 2**64 - 1, got {args.seed}")
    set_cpu_threads(args.threads)
    device = pick_device(args.device)
    autocast = autocast_for(args.dtype, device)  # (checks --dtype before any loading)
    model, ckpt = load_model(args.ckpt, device)
    tokenizer = tokenizer_for(ckpt)  # (a checkpoint without one is a one-line error)
    texts = read_text(args.prompts, 'prompts file').splitlines() if args.prompts else \
        [args.prompt] * args.num_samples
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
    if args.draft_vocab and not args.speculative:
        raise UserError("--draft_vocab trims the drafts of the heads: give --speculative=true")
    if args.prompts and args.num_samples > 1:
        raise UserError("--num_samples repeats --prompt; with --prompts, repeat lines of the file")
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
