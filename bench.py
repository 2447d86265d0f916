"""
Benchmarks of nanoMTP, one section per question:

    python bench.py decode --ckpt=out/ckpt.pt                       # vanilla vs self-speculative
    python bench.py decode --ckpt=out/ckpt.pt --draft=small/ckpt.pt  # ... and a draft model

decode: the same prompts (num_prompts windows of prompt_len tokens, evenly spaced over the
checkpoint's val.bin, or --data=path/to/val.bin) are decoded by every mode with the same checkpoint
and the same KV cache code (sample.py), after a warm-up, `repeats` times, modes interleaved prompt
by prompt. It prints tokens/s (median over repeats), the speedup over vanilla, tau, the
per-position acceptance and whether the greedy outputs equal vanilla's, at temperature 0 and at
--temperature, then a JSON line. Speedup = tokens/s of a mode / tokens/s of vanilla. ms/fwd = wall time per target
forward, i.e. per step (the step's Python work, a draft model's forwards and the prefills
included), so speedup ~ tau x ms/fwd of vanilla / ms/fwd of the mode: what separates tau from the
speedup is how much more a speculative step costs than a plain one.
--threads=1 (default; 0 = torch's default): decoding one sequence of a small model is latency
bound, and on CPU extra threads mostly add synchronization -- more so for the k+1-token verify
forwards than for single tokens (measured here: 2 threads made both modes slower and the verify
forward 1.7x a single-token one, against 1.35x with 1 thread).

    python bench.py train --compare="n_future=1;memory_efficient=true"   # step time, memory
    python bench.py train --vocab_size=50257 --compare="memory_efficient=true;n_future=1"

train: train.py's own training loop on a synthetic corpus of vocab_size tokens, the base variant
(the flags) and every --compare variant in a fresh process each: median ms/iter after `warmup`
iterations, tokens/s, peak memory (CPU: max RSS, and "step MB", its rise over the RSS before
training started), and on CUDA the MFU against --peak_tflops (989: H100/H200 dense bf16).

To add a section: write bench_<name>(argv) returning a summary dict and register it in SECTIONS.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from model import UserError, parse_flags, pick_device, autocast_for, set_cpu_threads
from heads import load_model, val_path
from sample import generate, generate_self_speculative, generate_two_model
from train import TrainConfig, train


# -----------------------------------------------------------------------------
# decode

DECODE_FLAGS = dict(ckpt='out/ckpt.pt', draft='', gamma=4, data='', num_prompts=20,
                    prompt_len=64, max_new_tokens=64, repeats=3, temperature=0.8, top_k=0,
                    top_p=1.0, seed=1337, device='auto', dtype='auto', threads=1)


def val_prompts(ckpt, data_path, num_prompts, prompt_len):
    """num_prompts windows of prompt_len tokens, evenly spaced over the validation tokens."""
    data_path = data_path or val_path(ckpt)
    if not os.path.isfile(data_path):
        raise UserError(f"validation tokens not found: {data_path}; pass --data=path/to/val.bin")
    data = np.memmap(data_path, dtype=np.uint16, mode='r')
    if len(data) < prompt_len or num_prompts < 1 or prompt_len < 1:
        raise UserError(f"cannot cut {num_prompts} prompts of {prompt_len} tokens from "
                        f"{data_path} ({len(data)} tokens)")
    starts = np.linspace(0, len(data) - prompt_len, num_prompts).astype(int)
    return [data[s:s + prompt_len].astype(np.int64).tolist() for s in starts]


def bench_decode(argv):
    args = parse_flags(argv, DECODE_FLAGS)
    set_cpu_threads(args['threads'])
    if args['repeats'] < 1 or args['max_new_tokens'] < 1:
        raise UserError("repeats and max_new_tokens must be >= 1")
    device = pick_device(args['device'])
    autocast = autocast_for(args['dtype'], device)
    model, ckpt = load_model(args['ckpt'], device)
    prompts = val_prompts(ckpt, args['data'], args['num_prompts'], args['prompt_len'])
    n_new = args['max_new_tokens']
    modes = {'vanilla': lambda prompt, **kw: generate(model, prompt, n_new, **kw)}
    if model.config.n_future > 1:
        modes['self'] = lambda prompt, **kw: generate_self_speculative(model, prompt, n_new, **kw)
    if args['draft']:
        draft, _ = load_model(args['draft'], device)
        modes['draft'] = lambda prompt, **kw: generate_two_model(model, draft, prompt, n_new,
                                                                 args['gamma'], **kw)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

    def run_all(seed, **sampling):
        """Decode every prompt in every mode, modes interleaved prompt by prompt (so a slow patch
        of a shared machine hits all modes alike); per mode: (tokens/s, summed Stats, outputs)."""
        generators = {mode: torch.Generator(device).manual_seed(seed) for mode in modes}
        seconds = {mode: 0.0 for mode in modes}
        stats, outputs = {}, {mode: [] for mode in modes}
        for prompt in prompts:
            for mode in modes:
                sync()
                t0 = time.perf_counter()
                result = modes[mode](prompt, generator=generators[mode], **sampling)
                sync()
                seconds[mode] += time.perf_counter() - t0
                stats[mode] = result.stats if mode not in stats else stats[mode].add(result.stats)
                outputs[mode].append(result.tokens)
        return {mode: (stats[mode].new_tokens / seconds[mode], stats[mode], outputs[mode])
                for mode in modes}

    settings = {'greedy': dict(temperature=0.0),
                'sampling': dict(temperature=args['temperature'], top_k=args['top_k'],
                                 top_p=args['top_p'])}
    results = {}
    with autocast:
        for mode in modes:  # warm-up: allocator, kernels, caches
            modes[mode](prompts[0], temperature=0.0)
            modes[mode](prompts[0], generator=torch.Generator(device), **settings['sampling'])
        for setting, sampling in settings.items():
            speeds, ms_per_forward = {mode: [] for mode in modes}, {mode: [] for mode in modes}
            stats, outputs = {}, {}
            for r in range(args['repeats']):
                for mode, (tokens_per_s, stats[mode], outputs[mode]) in run_all(
                        args['seed'] + r, **sampling).items():
                    speeds[mode].append(tokens_per_s)
                    ms_per_forward[mode].append(1000 * stats[mode].new_tokens / tokens_per_s
                                                / stats[mode].target_forwards)
            vanilla_speed = statistics.median(speeds['vanilla'])
            results[setting] = {}
            for mode in modes:
                s = stats[mode].summary()
                results[setting][mode] = dict(
                    tokens_per_s=statistics.median(speeds[mode]),
                    speedup=statistics.median(speeds[mode]) / vanilla_speed,
                    tau=s['tau'], acceptance=s['acceptance'],
                    ms_per_forward=statistics.median(ms_per_forward[mode]),
                    target_forwards=s['target_forwards'], draft_forwards=s['draft_forwards'],
                    identical=outputs[mode] == outputs['vanilla'] if setting == 'greedy' else None)

    print(f"decode benchmark: {args['ckpt']} ({model.config.n_future} heads), {len(prompts)} "
          f"prompts x {args['prompt_len']} tokens -> {n_new} new tokens, {args['repeats']} "
          f"repeats, device {device}, dtype {args['dtype']}")
    for setting, rows in results.items():
        temperature = settings[setting]['temperature']
        print(f"{setting} (temperature {temperature})")
        print(f"  {'mode':8} {'tokens/s':>9} {'speedup':>8} {'tau':>5} {'ms/fwd':>6} "
              f"{'target fwd':>10} {'draft fwd':>9}  {'greedy == vanilla':17}  "
              f"acceptance by position")
        for mode, row in rows.items():
            acceptance = ' '.join('-' if a is None else f"{a:.2f}" for a in row['acceptance'])
            same = {True: 'yes', False: 'NO', None: '-'}[row['identical']]
            print(f"  {mode:8} {row['tokens_per_s']:9.1f} {row['speedup']:7.2f}x "
                  f"{row['tau'] or 0:5.2f} {row['ms_per_forward']:6.3f} "
                  f"{row['target_forwards']:10d} "
                  f"{row['draft_forwards']:9d}  {same:17}  {acceptance or '-'}")
    summary = dict(section='decode', ckpt=args['ckpt'], draft=args['draft'] or None,
                   n_future=model.config.n_future, num_prompts=len(prompts),
                   prompt_len=args['prompt_len'], max_new_tokens=n_new, repeats=args['repeats'],
                   device=device, dtype=args['dtype'], **results)
    print(json.dumps(summary))
    return summary


# -----------------------------------------------------------------------------
# train

TRAIN_FLAGS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, vocab_size=65,
                   n_future=4, attach_layer=-1, head_type='block', memory_efficient=False,
                   iters=20, warmup=5, device='cpu', dtype='auto', compile=False,
                   compare='', peak_tflops=989.0)


def train_config(args, data_dir, out_dir):
    """The TrainConfig of one benchmarked variant: train.py's own loop on a synthetic corpus."""
    keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'n_future', 'attach_layer',
            'head_type', 'memory_efficient', 'device', 'dtype', 'compile')
    return TrainConfig(**{k: args[k] for k in keys}, data_dir=data_dir, out_dir=out_dir,
                       max_iters=args['warmup'] + args['iters'], eval_interval=10 ** 9,
                       eval_iters=1, quiet=True)


def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def bench_train_one(argv):
    """One variant in this process: median ms/iter of train.py's step, tokens/s, MFU on CUDA,
    and peak memory (CPU: max RSS and its rise over the RSS before training; CUDA: allocated)."""
    args = parse_flags(argv, TRAIN_FLAGS)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split in ('train', 'val'):
            rng.integers(0, args['vocab_size'], 200_000, dtype=np.uint16).tofile(
                os.path.join(tmp, f'{split}.bin'))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump({'kind': 'synthetic', 'vocab_size': args['vocab_size']}, f)
        cfg = train_config(args, tmp, os.path.join(tmp, 'out'))
        rss_before = rss_mb()
        summary = train(cfg)
    step_ms = statistics.median(summary['step_ms'][args['warmup']:])
    model = summary['model']
    tokens = cfg.batch_size * cfg.block_size
    # FLOPs per token: 6 per parameter (forward + backward; the tied unembedding runs once per
    # head) + attention scores (PaLM appendix B)
    c = model.config
    flops = (6 * (model.num_params() + (c.n_future - 1) * c.vocab_size * c.n_embd)
             + 12 * model.num_cache_layers() * c.n_embd * cfg.block_size)
    result = dict(ms_per_iter=step_ms, tokens_per_s=tokens / step_ms * 1000,
                  params=model.num_params())
    if 'cuda' in str(next(model.parameters()).device):
        result['mfu'] = flops * result['tokens_per_s'] / (args['peak_tflops'] * 1e12)
        result['peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_mb=peak, step_mb=peak - rss_before)
    print(json.dumps(result))
    return result


def bench_train(argv):
    """The base variant and every --compare variant ("n_future=1;memory_efficient=true"), each
    in a fresh process (so peak memory is its own), with ratios to the base."""
    args = parse_flags(argv, TRAIN_FLAGS)
    base = [a for a in argv if not a.startswith('--compare=')]
    variants = [('base', base)]
    for variant in filter(None, args['compare'].split(';')):
        extra = [f'--{item.strip()}' for item in variant.split(',')]
        parse_flags(base + extra, TRAIN_FLAGS)  # fail early on a bad variant
        variants.append((variant, base + extra))
    rows = []
    for name, flags in variants:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), 'train_one', *flags],
                              capture_output=True, text=True)
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise UserError(f"variant {name} failed: {why}")
        rows.append(dict(variant=name, **json.loads(proc.stdout.strip().splitlines()[-1])))
    shape = {k: args[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size',
                                  'vocab_size', 'n_future', 'head_type', 'memory_efficient')}
    print(f"train benchmark: {shape}, {args['iters']} timed iters after {args['warmup']}, "
          f"device {args['device']}")
    print(f"  {'variant':34} {'ms/iter':>8} {'x base':>7} {'tokens/s':>9} {'peak MB':>8} "
          f"{'step MB':>8} {'x base':>7} {'MFU':>6}")
    for row in rows:
        row['time_ratio'] = row['ms_per_iter'] / rows[0]['ms_per_iter']
        memory = 'step_mb' if 'step_mb' in row else 'peak_mb'
        row['memory_ratio'] = row[memory] / rows[0][memory]
        print(f"  {row['variant']:34} {row['ms_per_iter']:8.1f} {row['time_ratio']:6.2f}x "
              f"{row['tokens_per_s']:9.0f} {row['peak_mb']:8.0f} {row.get('step_mb', 0):8.0f} "
              f"{row['memory_ratio']:6.2f}x {row.get('mfu', 0):6.1%}")
    summary = dict(section='train', **shape, device=args['device'], rows=rows)
    print(json.dumps(summary))
    return summary


# -----------------------------------------------------------------------------

SECTIONS = {'decode': bench_decode, 'train': bench_train, 'train_one': bench_train_one}


def main(argv):
    if not argv or argv[0] not in SECTIONS:
        raise UserError(f"usage: python bench.py {{{'|'.join(SECTIONS)}}} --name=value ...")
    return SECTIONS[argv[0]](argv[1:])


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
