"""
Benchmarks of nanoMTP, one section per question (--help lists every section's flags):

    python bench.py decode --ckpt=out/ckpt.pt [--draft=small/ckpt.pt]   # speculative decoding
    python bench.py decode --ckpt=out/ckpt.pt --heads=out-b/ckpt.pt --peers=true --assistant=...
    python bench.py train --compare="n_future=1;memory_efficient=true"   # step time, memory
    python bench.py marginalize --ckpt=out/ckpt.pt --positions=256      # batched vs naive

decode also reports ms/fwd, the wall time per target forward: speedup ~ tau x ms/fwd of vanilla
/ ms/fwd of the mode. One CPU thread by default: small-model decoding is latency bound (2 threads
made a verify forward 1.7x a single-token one, against 1.35x with 1). New sections go in SECTIONS.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, asdict, fields, replace
from functools import partial
from unittest.mock import patch

import numpy as np
import torch

from common import (UserError, TrainConfig, flag, parse_flags, MarginalizeFlags, DecodeFlags,
                    help_text, cli, check_ranges, pick_device, autocast_for, set_cpu_threads,
                    clock, load_model)
from convert import to_hf
from data.text import val_prompts, check_draft, frequent_tokens
from metrics import marginalize_inputs, eval_windows, window_batch, check_cost
from marginalize import marginalize, marginalize_naive
from heads import next_token_logits
import batched
import drafters
import sample
from decoding import Stats, Generation
from sample import generate, generate_self_speculative, generate_two_model
from train import train


# -----------------------------------------------------------------------------
# decode

@dataclass
class DecodeBench(DecodeFlags):
    """python bench.py decode --ckpt=out/ckpt.pt [--name=value ...]
Vanilla vs self-speculative (and two-model) decoding on the same val prompts: speedup, tau."""
    threads: int = flag(1, "CPU threads (0 = torch's default); see the docstring")
    data: str = flag('', "val.bin to cut prompts from (default: the checkpoint's)")
    num_prompts: int = flag(20, "prompts, evenly spaced over the val tokens")
    prompt_len: int = flag(64, "tokens per prompt")
    max_new_tokens: int = flag(64, "tokens generated per prompt")
    repeats: int = flag(3, "runs of every mode (the median is reported)")
    heads: str = flag('', "more checkpoints of the same next-token model: a self row each")
    peers: bool = flag(False, "also transformers: generate, prompt lookup, assisted generation")
    assistant: str = flag('', "--peers: a small checkpoint, exported as the assistant model")
    lookup: int = flag(10, "--peers: prompt_lookup_num_tokens")
    breakdown: bool = flag(False, "also: where a step's time goes (forward, drafts, verify, rest)")
    batch_sizes: str = flag('', "e.g. 1,2,4,8: batched decoding (greedy) at each batch size, on "
                                "max(num_prompts, largest size) prompts; --peers: transformers")
    plot: str = flag('', "with --batch_sizes: a PNG of tokens/s against batch size (matplotlib)")


def print_rows(setting, temperature, rows):
    width = max(8, *map(len, rows))
    print(f"{setting} (temperature {temperature})\n  {'mode':{width}} {'tokens/s':>9} "
          f"{'speedup':>8} {'tau':>5} {'ms/fwd':>6} {'target fwd':>10} {'draft fwd':>9}  "
          f"{'greedy == vanilla':17}  acceptance by position")
    for mode, row in rows.items():
        acceptance = ' '.join('-' if a is None else f"{a:.2f}" for a in row['acceptance'])
        same = {True: 'yes', False: 'NO', None: '-'}[row['identical']]
        print(f"  {mode:{width}} {row['tokens_per_s']:9.1f} {row['speedup']:7.2f}x "
              f"{row['tau'] or 0:5.2f} {row['ms_per_forward']:6.3f} {row['target_forwards']:10d} "
              f"{row['draft_forwards']:9d}  {same:17}  {acceptance or '-'}")


def decode_modes(model, ckpt, args, prompts, device):
    """{mode: decode(prompt, **sampling)}: vanilla; self, the --ckpt's heads, and self:<dir> for
    each --heads checkpoint, which must decode the same next-token model (else their speedups
    would not compare); draft, --draft's; --peers: transformers on the same weights (hf: its
    generate(), hf-lookup: prompt lookup, hf-assist: assisted by --assistant)."""
    block = model.config.block_size  # (a longer prompt slides: compare its last window)
    n_new, x = args.max_new_tokens, torch.tensor([prompts[0][-block:]], device=device)
    modes = {'vanilla': partial(generate, model, max_new_tokens=n_new)}
    for path in [args.ckpt, *filter(None, args.heads.split(','))]:
        other = model if path == args.ckpt else load_model(path, device)[0]
        with torch.no_grad():
            if other is not model and not torch.allclose(
                    next_token_logits(other, x), next_token_logits(model, x), atol=1e-4):
                raise UserError(f"--heads {path} has another next-token model than --ckpt: "
                                f"its speedup would not be comparable")
        if other.config.n_future > 1:
            name = 'self' if other is model else f"self:{os.path.basename(os.path.dirname(path))}"
            modes[name] = partial(generate_self_speculative, other, max_new_tokens=n_new)
            if args.draft_vocab and other is model:  # the heads drafting from a subset
                modes[f'self@{args.draft_vocab}'] = partial(
                    generate_self_speculative, other, max_new_tokens=n_new,
                    draft_vocab=frequent_tokens(ckpt, args.draft_vocab))
    if args.draft:
        draft, draft_ckpt = load_model(args.draft, device)
        check_draft(ckpt, draft_ckpt)  # the same tokenizer, as sample.py requires
        modes['draft'] = partial(generate_two_model, model, draft, max_new_tokens=n_new,
                                 gamma=args.gamma)
    if args.assistant and not args.peers:
        raise UserError("--assistant is transformers' assisted generation: add --peers=true")
    if not args.peers:
        return modes
    if args.prompt_len + n_new + args.lookup > block:
        raise UserError(f"--peers: transformers has no sliding window (and prompt lookup may "
                        f"feed --lookup drafts past the end), so prompt_len + max_new_tokens + "
                        f"lookup must be <= block_size {block}")
    hf = to_hf(model)
    modes['hf'] = transformers_decoder(hf, n_new)
    modes['hf-lookup'] = transformers_decoder(hf, n_new, prompt_lookup_num_tokens=args.lookup)
    if args.assistant:
        assistant, assistant_ckpt = load_model(args.assistant, device)
        check_draft(ckpt, assistant_ckpt, 'assistant')  # (the same tokenizer, as --draft)
        modes['hf-assist'] = transformers_decoder(hf, n_new, to_hf(assistant))
    return modes


def transformers_decoder(hf, n_new, assistant=None, batched=False, **options):
    """A decode(prompt, generator, temperature, ...) that runs transformers' generate() and
    counts like ours: forward hooks count the target's forwards and the assistant's.
    prompt: a token list, or with batched a list of them (of one length)."""
    counts = dict(target=0, draft=0)
    for module, key in ((hf, 'target'), (assistant, 'draft')):
        if module is not None:
            module.register_forward_hook(lambda *_, key=key: counts.update({key: counts[key] + 1}))

    def decode(prompt, generator=None, temperature=0.0, top_k=0, top_p=1.0, stop=()):
        counts.update(target=0, draft=0)
        sampling = dict(do_sample=False) if temperature == 0 else dict(
            do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        if temperature:  # transformers samples with the global generator
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        t0 = time.perf_counter()
        ids = torch.tensor(prompt if batched else [prompt])
        with torch.no_grad():  # (an explicit mask: else generate() masks the pad id, a real token)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                              pad_token_id=0, assistant_model=assistant, **sampling, **options)
        stats, rows = Stats(), out[:, ids.size(1):].tolist()
        stats.new_tokens, stats.time_s = sum(map(len, rows)), time.perf_counter() - t0
        stats.target_forwards, stats.draft_forwards = counts['target'], counts['draft']
        stats.decode_forwards = len(rows) * (counts['target'] - 1)
        stats.decode_tokens = stats.new_tokens - len(rows)
        return Generation(rows if batched else rows[0], stats)
    return decode


# (part of a step, where it runs) for --breakdown: every drafter's work is 'drafts'
TIMED = [('forward', sample.Window, 'forward'), ('forward', batched.Batch, 'forward'),
         ('verify', sample, 'verify'), ('verify', batched, 'verify'),
         ('drafts', drafters.ModelDrafter, 'draft')]
TIMED += [('drafts', drafter, 'observe') for drafter in drafters.DRAFTERS.values()]
TIMED += [('drafts', drafter, part) for part in ('draft', 'observe')
          for drafter in (batched.EachRow, batched.LastRows, batched.DraftModelRows)]


def step_breakdown(modes, prompts, **sampling):
    """Per mode of ours (not transformers'), from one more pass over the prompts, printed: ms per
    new token in each part of TIMED, a timer wrapped around its functions (a part inside another
    counts for the outer one), and the 'rest' (the loop's bookkeeping)."""
    spent, rows, running = {}, {}, []

    def timed(part, fn):
        def wrapper(*args, **kw):
            t0, running[:] = time.perf_counter(), running + [part]
            try:
                return fn(*args, **kw)
            finally:
                running.pop()
                if not running:
                    spent[part] += time.perf_counter() - t0
        return wrapper
    with ExitStack() as wrapped:  # every TIMED function wrapped until the end of the block
        for part, owner, attr in TIMED:
            wrapped.enter_context(patch.object(owner, attr, timed(part, getattr(owner, attr))))
        for mode in [m for m in modes if not m.startswith('hf')]:
            spent.update(forward=0.0, drafts=0.0, verify=0.0)
            t0 = time.perf_counter()
            n = sum(modes[mode](prompt, generator=torch.Generator().manual_seed(0),
                                **sampling).stats.new_tokens for prompt in prompts)
            row = {part: 1000 * t / n for part, t in spent.items()}
            total = 1000 * (time.perf_counter() - t0) / n
            rows[mode] = dict(row, rest=total - sum(row.values()), total=total)
    print('  ms per new token: ' + '; '.join(f"{m} " + ' '.join(
        f"{k} {v:.3f}" for k, v in row.items()) for m, row in rows.items()))
    return rows


def measure(modes, prompts, device, repeats, seed, greedy, **sampling):
    """Per mode: median tokens/s and ms per target forward over the repeats, speedup, tau, ...
    Each repeat decodes every prompt in every mode, the modes interleaved prompt by prompt (so a
    slow patch of a shared machine hits all modes alike); the counts are the last repeat's."""
    speeds, ms = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for r in range(repeats):
        generators = {mode: torch.Generator(device).manual_seed(seed + r) for mode in modes}
        seconds, stats, outputs = dict.fromkeys(modes, 0.0), {}, {mode: [] for mode in modes}
        for prompt in prompts:
            for mode, decode in modes.items():
                elapsed = clock(device)
                result = decode(prompt, generator=generators[mode], **sampling)
                seconds[mode] += elapsed()
                stats[mode] = result.stats if mode not in stats else stats[mode].add(result.stats)
                outputs[mode].append(result.tokens)
        for mode in modes:
            speeds[mode].append(stats[mode].new_tokens / seconds[mode])
            ms[mode].append(1000 * seconds[mode] / stats[mode].target_forwards)
    rows, vanilla = {}, statistics.median(speeds['vanilla'])
    for mode in modes:
        s, speed = stats[mode].summary(), statistics.median(speeds[mode])
        rows[mode] = dict(tokens_per_s=speed, speedup=speed / vanilla, tau=s['tau'],
                          acceptance=s['acceptance'], ms_per_forward=statistics.median(ms[mode]),
                          target_forwards=s['target_forwards'], draft_forwards=s['draft_forwards'],
                          identical=outputs[mode] == outputs['vanilla'] if greedy else None)
    return rows


def batched_modes(model, ckpt, args, prompts, device):
    """decode_modes' modes (their checks and names), each decoding B prompts at once: a
    Generation of tokens per row, Stats summed over the rows (per-row tau) and target_forwards
    the batch's forwards; --peers: hf, transformers' batched generate."""
    modes = {}
    for name, single in decode_modes(model, ckpt, replace(args, peers=False), prompts,
                                     device).items():
        target, *draft = single.args
        if draft:
            sample.check_two_model(target, draft[0], args.gamma)
            drafting = dict(make_drafter=batched.model_drafter(draft[0], args.gamma),
                            n_drafts=args.gamma)
        elif single.func is generate_self_speculative:
            drafting = dict(make_drafter=batched.self_drafter(
                target, single.keywords.get('draft_vocab')), n_drafts=target.config.n_future - 1)
        else:
            drafting = {}  # vanilla
        modes[name] = partial(decode_rows, partial(batched.generate_batch, target,
                                                   max_new_tokens=args.max_new_tokens, **drafting))
    if args.peers:
        modes['hf'] = transformers_decoder(to_hf(model), args.max_new_tokens, batched=True)
    return modes


def decode_rows(decode_batch, prompts, **sampling):
    """The rows of decode_batch(prompts, ...) as one Generation (see batched_modes)."""
    rows = decode_batch(prompts, **sampling)
    stats = Stats(len(rows[0].stats.drafted))
    for row in rows:
        stats.add(row.stats)
    stats.target_forwards = max(row.stats.target_forwards for row in rows)
    return Generation([row.tokens for row in rows], stats)


def plot_batched(results, modes, path):
    try:
        from matplotlib import pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no PNG written")
        return
    plt.switch_backend('Agg')
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = list(results)
    for mode in modes:
        ax.plot(sizes, [results[b][mode]['tokens_per_s'] for b in sizes], 'o-', label=mode)
    ax.set(xscale='log', yscale='log', xlabel='batch size', ylabel='tokens/s (greedy)')
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=110)
    os.replace(path + '.tmp.png', path)


def bench_decode(argv):
    """Every mode on the same prompts, greedy then sampling; --batch_sizes: batched and greedy."""
    args = parse_flags(argv, DecodeBench())
    set_cpu_threads(args.threads)
    check_ranges(args, positive=('repeats', 'max_new_tokens', 'lookup'),
                 non_negative=('draft_vocab',))
    sizes = args.batch_sizes.split(',') if args.batch_sizes else []
    if not all(b.strip().isdecimal() and int(b) > 0 for b in sizes):
        raise UserError(f"--batch_sizes must be positive integers, got {args.batch_sizes}")
    sizes = [int(b) for b in sizes]
    if args.plot and not sizes:
        raise UserError("--plot draws tokens/s against batch size: add --batch_sizes")
    device = pick_device(args.device)
    if args.peers and device != 'cpu':
        raise UserError("--peers runs transformers on the CPU: use --device=cpu")
    model, ckpt = load_model(args.ckpt, device)
    prompts = val_prompts(ckpt, args.data, max([args.num_prompts] + sizes), args.prompt_len)
    if sizes:  # {batch size: (the prompts in batches of that size, greedy)}
        modes = batched_modes(model, ckpt, args, prompts, device)
        runs = {size: ([prompts[i:i + size] for i in range(0, len(prompts), size)],
                       dict(temperature=0.0)) for size in sizes}
    else:
        modes = decode_modes(model, ckpt, args, prompts, device)
        runs = {'greedy': (prompts, dict(temperature=0.0)), 'sampling': (prompts, dict(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))}
        print(f"decode benchmark: {args.ckpt} ({model.config.n_future} heads), {len(prompts)} "
              f"prompts x {args.prompt_len} tokens -> {args.max_new_tokens} new tokens, "
              f"{args.repeats} repeats, device {device}, dtype {args.dtype}")
    results = {}
    with autocast_for(args.dtype, device):
        for run, (inputs, sampling) in runs.items():
            for decode in modes.values():  # warm-up: allocator, kernels, caches
                decode(inputs[0], generator=torch.Generator(device), **sampling)
            results[run] = measure(modes, inputs, device, args.repeats, args.seed,
                                   run != 'sampling', **sampling)
            print_rows(f"batch size {run}" if sizes else run, sampling['temperature'],
                       results[run])
            if args.breakdown and sizes:
                results[run]['ms_per_token'] = step_breakdown(modes, inputs, **sampling)
            elif args.breakdown:
                results[f'{run}_ms_per_token'] = step_breakdown(modes, inputs, **sampling)
    if sizes and args.plot:
        plot_batched(results, modes, args.plot)
    summary = dict(section='decode', ckpt=args.ckpt, draft=args.draft or None,
                   heads=args.heads or None, assistant=args.assistant or None,
                   n_future=model.config.n_future, num_prompts=len(prompts),
                   prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                   repeats=args.repeats, device=device, dtype=args.dtype, threads=args.threads,
                   plot=args.plot or None, **(dict(batched=results) if sizes else results))
    print(json.dumps(summary))
    return summary


# -----------------------------------------------------------------------------
# train

@dataclass
class TrainBench(TrainConfig):
    """python bench.py train [--name=value ...] [--compare="n_future=1;memory_efficient=true"]
train.py's step on a synthetic corpus, each variant in a fresh process: ms/iter, memory, MFU.
Every train.py flag (model shape, head type, device, dtype, compile, ...) can be benchmarked."""
    vocab_size: int = flag(65, "of the synthetic corpus (50257: GPT-2's BPE)")
    iters: int = flag(20, "timed iterations")
    warmup: int = flag(5, "untimed iterations first")
    compare: str = flag('', "variants: \"flag=value,flag=value;flag=value\" (';' between)")
    peak_tflops: float = flag(989.0, "for MFU (989: H100/H200 dense bf16)")
    block_size: int = flag(64, "context length (train.py's flag, the benchmark's default)")
    batch_size: int = flag(16, "sequences per step")
    device: str = flag('cpu', "cpu | cuda | mps")


TRAIN_FIXED = ('out_dir', 'dataset', 'data_dir', 'init_from', 'eval_interval', 'eval_iters',
               'log_interval', 'max_iters', 'doc_len', 'doc_prompt', 'quiet')  # the benchmark's


def train_bench_flags(argv):
    args = parse_flags(argv, TrainBench(), fixed=TRAIN_FIXED)
    check_ranges(args, positive=('iters',), non_negative=('warmup',))
    if not 1 <= args.vocab_size <= 2 ** 16:
        raise UserError(f"vocab_size must be in 1..65536 (token ids are uint16), got "
                        f"{args.vocab_size}")
    return args


def bench_train_one(argv):
    """One variant in this process: median ms/iter of train.py's step, tokens/s, MFU on CUDA,
    and peak memory (CPU: max RSS and its rise over the RSS before training; CUDA: allocated)."""
    args = train_bench_flags(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split in ('train', 'val'):
            rng.integers(0, args.vocab_size, 200_000, dtype=np.uint16).tofile(f'{tmp}/{split}.bin')
        with open(f'{tmp}/meta.json', 'w') as f:
            json.dump({'kind': 'synthetic', 'vocab_size': args.vocab_size}, f)
        cfg = replace(TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}),
                      data_dir=tmp, out_dir=os.path.join(tmp, 'out'), eval_interval=10 ** 9,
                      max_iters=args.warmup + args.iters, eval_iters=1, quiet=True)
        with open('/proc/self/statm') as f:  # the resident set size before training, in MB
            rss_before = int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
        summary = train(cfg)
    step_ms, model = statistics.median(summary['step_ms'][args.warmup:]), summary['model']
    flops = model.flops_per_token(cfg.block_size)
    result = dict(ms_per_iter=step_ms,
                  tokens_per_s=cfg.batch_size * cfg.block_size / step_ms * 1000,
                  params=model.num_params())
    if 'cuda' in str(next(model.parameters()).device):
        result['mfu'] = flops * result['tokens_per_s'] / (args.peak_tflops * 1e12)
        result['peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_mb=peak, step_mb=peak - rss_before)
    print(json.dumps(result))
    return result


def bench_train(argv):
    """The base and every --compare variant, each in a fresh process (its own peak memory)."""
    args = train_bench_flags(argv)
    base = [a for a in argv if not a.startswith('--compare=')]
    variants = [('base', base)] + [(v, base + [f'--{item.strip()}' for item in v.split(',')])
                                   for v in filter(None, args.compare.split(';'))]
    for _, flags in variants:
        train_bench_flags(flags)  # fail early on a bad variant
    rows = []
    for name, flags in variants:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), 'train_one', *flags],
                              capture_output=True, text=True)
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise UserError(f"variant {name} failed: {why}")
        rows.append(dict(variant=name, **json.loads(proc.stdout.strip().splitlines()[-1])))
    shape = {k: getattr(args, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size',
             'batch_size', 'vocab_size', 'n_future', 'head_type', 'memory_efficient')}
    print(f"train benchmark: {shape}, {args.iters} timed iters after {args.warmup}, "
          f"device {args.device}")
    print(f"  {'variant':34} {'ms/iter':>8} {'x base':>7} {'tokens/s':>9} {'peak MB':>8} "
          f"{'step MB':>8} {'x base':>7} {'MFU':>6}")
    for row in rows:
        row['time_ratio'] = row['ms_per_iter'] / rows[0]['ms_per_iter']
        memory = 'step_mb' if 'step_mb' in row else 'peak_mb'
        row['memory_ratio'] = row[memory] / rows[0][memory]
        print(f"  {row['variant']:34} {row['ms_per_iter']:8.1f} {row['time_ratio']:6.2f}x "
              f"{row['tokens_per_s']:9.0f} {row['peak_mb']:8.0f} {row.get('step_mb', 0):8.0f} "
              f"{row['memory_ratio']:6.2f}x {row.get('mfu', 0):6.1%}")
    summary = dict(section='train', **shape, device=args.device, rows=rows)
    print(json.dumps(summary))
    return summary


# -----------------------------------------------------------------------------
# marginalize

@dataclass
class MarginalizeBench(MarginalizeFlags):
    """python bench.py marginalize --ckpt=out/ckpt.pt [--name=value ...]
Batched (KV cache + tree attention) vs naive marginalization on the same positions."""
    ckpt: str = flag('out/ckpt.pt', "checkpoint path (or gpt2 / gpt2-medium / ...)")
    k_ahead: int = flag(2, "estimate x_{t+1} .. x_{t+k_ahead}")
    top_k: str = flag('8', "candidates per step: one number, or 'all'")


def naive_vs_batched(model, tokens, positions=64, k_ahead=2, top_k=8, top_p=1.0, max_paths=0,
                     chunk_size=512, window=0, seed=0):
    """Both estimators on the same positions: max abs difference, seconds, speedup, cost."""
    device = next(model.parameters()).device
    window = min(window or model.config.block_size, model.config.block_size)
    windows = eval_windows(len(tokens), window, k_ahead, positions, seed)
    batches = [window_batch(tokens, start, n, k_ahead, device)[0] for start, n in windows]
    args = dict(k_ahead=k_ahead, top_k=top_k, top_p=top_p, max_paths=max_paths)
    marginalize(model, batches[0], [0], **args)  # warm-up
    results, seconds = {}, {}
    for name, estimator, extra in (('naive', marginalize_naive, {}),
                                   ('batched', marginalize, dict(chunk_size=chunk_size))):
        elapsed = clock(device)
        results[name] = [estimator(model, seq, torch.arange(len(seq) - k_ahead), **args, **extra)
                         for seq in batches]
        seconds[name] = elapsed()
    diff = max(max(float((a.probs - b.probs).abs().max()), float((a.mass - b.mass).abs().max()))
               for a, b in zip(results['naive'], results['batched']))
    cost = {f"{name}_{key}": sum(getattr(e, key) for e in results[name])
            for key in ('forward_tokens', 'forwards') for name in results}
    return dict(positions=sum(n for _, n in windows), k_ahead=k_ahead, top_k=top_k, top_p=top_p,
                max_paths=max_paths, max_abs_diff=diff, naive_s=seconds['naive'],
                batched_s=seconds['batched'], speedup=seconds['naive'] / seconds['batched'], **cost)


def bench_marginalize(argv):
    args = parse_flags(argv, MarginalizeBench())
    top_ks, model, tokens, source = marginalize_inputs(args, single_top_k=True)
    check_cost(args, top_ks, model, tokens, heads=False)  # (bench runs no heads row)
    result = dict(section='marginalize', ckpt=args.ckpt, data=source, **naive_vs_batched(
        model, tokens, args.positions, args.k_ahead, top_ks[0], args.top_p, args.max_paths,
        args.chunk_size, args.window, args.seed))
    print(f"{result['positions']} positions, k_ahead={result['k_ahead']}, top_k={result['top_k']}: "
          f"max abs diff {result['max_abs_diff']:.2e}, naive {result['naive_s']:.2f}s, batched "
          f"{result['batched_s']:.2f}s, speedup {result['speedup']:.1f}x")
    print(json.dumps(result))
    return result


SECTIONS = {'decode': bench_decode, 'train': bench_train, 'marginalize': bench_marginalize,
            'train_one': bench_train_one}


def main(argv):
    if argv and argv[0] in ('--help', '-h'):
        for config, fixed in ((DecodeBench, ()), (TrainBench, TRAIN_FIXED), (MarginalizeBench, ())):
            flags = {k: v for k, v in asdict(config()).items() if k not in fixed}
            print(help_text(config(), flags) + '\n')
        sys.exit(0)
    if not argv or argv[0] not in SECTIONS:
        raise UserError("usage: python bench.py {decode|train|marginalize} --name=value ... "
                        "(--help lists the flags)")
    return SECTIONS[argv[0]](argv[1:])


if __name__ == '__main__':
    cli(main)
