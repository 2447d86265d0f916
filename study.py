"""
The paper's study at small scale: one command from corpus to results table.

    python study.py --quick=true --results_dir=results   # 2 corpora x 2 sizes x 2 seeds, ~12 min
    python study.py                     # the full setting (bigger models, longer runs: a GPU)

For every corpus, model size and seed it trains an NTP baseline, fine-tunes it with NTP for as
many iterations as every MTP adaptation gets (no row gets more training than another), evaluates
marginalization on it, adapts it to MTP with each strategy of the paper, trains an MTP model from
scratch with the same total iterations, sweeps attach_layer with a frozen trunk (seed 0),
measures greedy self-speculative decoding, and writes study_<setting>.md / .json (mean +- spread
over seeds) and a layer-sweep PNG (matplotlib optional). The two corpora differ in determinism:
tiny Shakespeare, and `counting` (the numbers 1.. in English words). Finished runs are reused.
"""
import json
import os
import statistics
import time
from dataclasses import dataclass, asdict, replace

import numpy as np
import torch

from common import UserError, parse_flags, load_model, val_prompts, REPO, cli
from data.prepare import prepare, load_meta
import train as trainer
from marginalize import evaluate_table
from sample import generate, generate_self_speculative
from bench import measure

SHAKESPEARE = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt')


@dataclass
class StudyConfig:
    """python study.py [--quick=true] [--name=value ...]
The paper's study at small scale: every strategy, marginalization, MTP from scratch, per seed."""
    out_dir: str = 'out-study'      # data, runs and checkpoints
    results_dir: str = ''           # study_{quick,full}.md / .json / _layer_sweep.png (default out_dir)
    corpora: str = 'shakespeare_char,counting'  # names, or paths to text files (char tokenizer)
    shakespeare: str = ''           # local tinyshakespeare.txt (default: ../shared or data/)
    sizes: str = 'S,M'              # model sizes, see SIZES
    seeds: int = 2                  # seeds per (corpus, size)
    n_future: int = 2               # heads of the MTP models
    base_iters: int = 3000          # NTP pretraining from scratch
    adapt_iters: int = 1000         # fine-tuning / each MTP adaptation
    head_warmup_iters: int = 250    # of adapt_iters
    trunk_lr_scale: float = 0.25    # differential LR (Medusa-2: heads 4x the backbone)
    adapt_lr: float = 3e-4          # peak LR of the adaptations
    batch_size: int = 32            # sequences per step
    block_size: int = 128           # context length
    eval_iters: int = 20            # batches per evaluation
    positions: int = 2048           # positions for the accuracy table
    decode_prompts: int = 10        # greedy self-speculative decoding: prompts x new tokens
    decode_tokens: int = 128        # (see decode_prompts)
    sweep: bool = True              # the attach_layer sweep
    device: str = 'auto'            # auto (cuda > mps > cpu) | cpu | cuda | mps
    quick: bool = False             # the 2-core-CPU setting: QUICK_SIZES, and QUICK's defaults


# n_layer, n_head, n_embd per size; QUICK_SIZES for --quick
SIZES = {'S': (4, 4, 128), 'M': (8, 8, 256), 'L': (12, 12, 384)}
QUICK_SIZES = {'S': (2, 2, 48), 'M': (4, 4, 96)}
QUICK = dict(base_iters=500, adapt_iters=150, head_warmup_iters=40, batch_size=16, block_size=64,
             eval_iters=8, positions=512, decode_prompts=4, decode_tokens=64, adapt_lr=1e-3)

STRATEGIES = {  # name -> train.py flags for the adaptation (trunk_lr_scale filled in later)
    'heads only (frozen trunk)': dict(freeze_trunk=True),
    'joint fine-tuning': dict(),
    'head warmup': dict(head_warmup_iters=None),
    'diff. LR': dict(trunk_lr_scale=None),
    'head warmup + diff. LR': dict(head_warmup_iters=None, trunk_lr_scale=None),
    'diff. LR + WHS': dict(trunk_lr_scale=None, whs=True),
}


# -----------------------------------------------------------------------------
# corpora

def counting_text(n=60000):
    """The numbers 1..n in English words, comma separated: a highly predictable corpus."""
    ones = ('zero one two three four five six seven eight nine ten eleven twelve thirteen '
            'fourteen fifteen sixteen seventeen eighteen nineteen').split()
    tens = 'twenty thirty forty fifty sixty seventy eighty ninety'.split()

    def words(i):
        if i < 20:
            return ones[i]
        if i < 100:
            return tens[i // 10 - 2] + ('-' + ones[i % 10] if i % 10 else '')
        if i < 1000:
            return ones[i // 100] + ' hundred' + (' and ' + words(i % 100) if i % 100 else '')
        return words(i // 1000) + ' thousand' + (' ' + words(i % 1000) if i % 1000 else '')
    return ',\n'.join(words(i) for i in range(1, n + 1)) + '\n'


def prepare_corpus(name, cfg):
    """data dir of a char-level corpus under out_dir/data (prepared once)."""
    data_dir = os.path.join(cfg.out_dir, 'data', os.path.basename(name).split('.')[0])
    if os.path.isfile(os.path.join(data_dir, 'meta.json')):
        return data_dir
    if name == 'counting':
        text = counting_text()
    else:
        path = name
        if name == 'shakespeare_char':
            candidates = [cfg.shakespeare, SHAKESPEARE,
                          os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt')]
            path = next((p for p in candidates if p and os.path.isfile(p)), '')
            if not path:
                raise UserError("tiny Shakespeare not found: pass --shakespeare=path/to/"
                                "tinyshakespeare.txt (or run python data/prepare.py once)")
        if not os.path.isfile(path):
            raise UserError(f"corpus not found: {name} (use shakespeare_char, counting or a "
                            f"text file)")
        with open(path, encoding='utf-8') as f:
            text = f.read()
    prepare(text, data_dir, 'char')
    return data_dir


# -----------------------------------------------------------------------------
# one cell of the study: a corpus, a model size, a seed

def run_training(cfg, run_dir, data_dir, size, seed, **flags):
    """train.train with the study's shared settings; returns the checkpoint path."""
    n_layer, n_head, n_embd = size
    tc = trainer.TrainConfig(out_dir=run_dir, data_dir=data_dir, n_layer=n_layer, n_head=n_head,
                             n_embd=n_embd, batch_size=cfg.batch_size, block_size=cfg.block_size,
                             eval_iters=cfg.eval_iters, device=cfg.device, seed=seed, quiet=True,
                             head_type='block',
                             warmup_iters=min(100, flags.get('max_iters', 100) // 10))
    tc = replace(tc, **flags)
    tc = replace(tc, eval_interval=tc.max_iters)
    done = os.path.join(run_dir, 'done.json')
    if os.path.isfile(done):  # finished earlier with exactly this config: reuse it
        with open(done) as f:
            if json.load(f)['config'] == asdict(tc):
                return os.path.join(run_dir, 'ckpt.pt')
    summary = trainer.train(tc)
    with open(done, 'w') as f:
        json.dump(dict(config=asdict(tc), summary=trainer.printable(summary)), f)
    return summary['ckpt']


def val_tokens(data_dir):
    return np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.uint16, mode='r')


def accuracy(model, tokens, cfg, top_ks):
    """Rows of marginalize.evaluate_table (k_ahead = n_future) on the study's fixed positions."""
    return evaluate_table(model, tokens, positions=cfg.positions, k_ahead=cfg.n_future,
                          top_ks=top_ks, seed=0)


def decode_speed(model, data_dir, cfg):
    """Greedy self-speculative vs vanilla decoding on fixed val prompts, measured as bench.py
    decode does: tau, speedup, and whether the texts are identical (they must be)."""
    prompt_len = cfg.block_size // 2
    prompts = val_prompts({}, os.path.join(data_dir, 'val.bin'), cfg.decode_prompts, prompt_len)
    new = min(cfg.decode_tokens, model.config.block_size - prompt_len)
    modes = {'vanilla': lambda prompt, **kw: generate(model, prompt, new, **kw),
             'self': lambda prompt, **kw: generate_self_speculative(model, prompt, new, **kw)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench.py decode: small-model decoding is latency bound
    try:
        for decode in modes.values():  # warm-up
            decode(prompts[0], temperature=0.0)
        row = measure(modes, prompts, str(next(model.parameters()).device), 1, 0, True,
                      temperature=0.0)['self']
    finally:
        torch.set_num_threads(threads)
    return dict(tau=row['tau'], speedup=row['speedup'], identical=row['identical'])


def run_cell(cfg, corpus, size_name, seed, log):
    size = (QUICK_SIZES if cfg.quick else SIZES)[size_name]
    data_dir = prepare_corpus(corpus, cfg)
    setting = 'quick' if cfg.quick else 'full'
    cell_dir = os.path.join(cfg.out_dir, 'runs',
                            f"{setting}-{os.path.basename(data_dir)}-{size_name}-s{seed}")
    tokens = val_tokens(data_dir)
    vocab = load_meta(data_dir)['vocab_size']
    adapt = dict(max_iters=cfg.adapt_iters, learning_rate=cfg.adapt_lr, min_lr=cfg.adapt_lr / 10)

    def path(name):
        return os.path.join(cell_dir, name)

    rows = []
    base = run_training(cfg, path('base'), data_dir, size, seed, n_future=1,
                        max_iters=cfg.base_iters)
    ft = run_training(cfg, path('ft'), data_dir, size, seed, n_future=1, init_from=base, **adapt)
    model, _ = load_model(ft)
    exact = 0 if vocab <= 128 else 50
    for row in accuracy(model, tokens, cfg, [exact, 5, 1]):
        name = {0: 'exact, all V', 50: 'top_k=50'}.get(row['top_k'], f"top_k={row['top_k']}")
        rows.append(dict(strategy=f"FT NTP + marginalization ({name})", **scores(row)))
    log(f"{os.path.basename(cell_dir)}: baseline done")

    strategy_runs = {}
    for name, flags in STRATEGIES.items():
        flags = {k: (getattr(cfg, k) if v is None else v) for k, v in flags.items()}
        strategy_runs[name] = (run_training(cfg, path(slug(name)), data_dir, size, seed,
                                            n_future=cfg.n_future, init_from=base,
                                            **adapt, **flags), flags)
    strategy_runs['MTP from scratch (same total iters)'] = (run_training(
        cfg, path('scratch'), data_dir, size, seed, n_future=cfg.n_future,
        max_iters=cfg.base_iters + cfg.adapt_iters), {})
    for name, (ckpt, _) in strategy_runs.items():
        model, _ = load_model(ckpt)
        heads_row = accuracy(model, tokens, cfg, [])[-1]
        rows.append(dict(strategy=name, **scores(heads_row), **decode_speed(model, data_dir, cfg)))
        log(f"{os.path.basename(cell_dir)}: {name} done")

    sweep = []
    if cfg.sweep and seed == 0:
        for layer in range(size[0]):
            ckpt = run_training(cfg, path(f'attach{layer}'), data_dir, size, seed,
                                n_future=cfg.n_future, init_from=base, attach_layer=layer,
                                freeze_trunk=True, **adapt)
            model, _ = load_model(ckpt)
            sweep.append(dict(attach_layer=layer, **scores(accuracy(model, tokens, cfg, [])[-1])))
    return rows, sweep


def scores(row):
    """next (k=1) and 2nd/last (k=n_future) token accuracies of a table row."""
    return dict(next_top5=row['top5'][0], next_top1=row['top1'][0], second_top5=row['top5'][-1],
                second_top1=row['top1'][-1])


def slug(name):
    return ''.join(c if c.isalnum() else '_' for c in name).strip('_')


# -----------------------------------------------------------------------------
# the report

COLUMNS = ('next_top5', 'second_top5', 'next_top1', 'second_top1', 'tau', 'speedup')


def aggregate(rows_per_seed):
    """Mean and spread (half the max-min range) over seeds, row by row."""
    table = []
    for rows in zip(*rows_per_seed):
        entry = dict(strategy=rows[0]['strategy'])
        for col in COLUMNS:
            values = [r[col] for r in rows if r.get(col) is not None]
            if values:
                entry[col] = statistics.fmean(values)
                entry[col + '_spread'] = (max(values) - min(values)) / 2
        entry['identical'] = all(r.get('identical', True) for r in rows)
        table.append(entry)
    return table


def markdown(results, cfg):
    second = {2: '2nd', 3: '3rd'}.get(cfg.n_future, f'{cfg.n_future}th')
    lines = []
    for key, cell in results.items():
        n_seeds = cell['seeds']
        lines += [f"**{key}** ({cell['params']}, {n_seeds} seed{'s' * (n_seeds > 1)}, "
                  f"mean ± half-range)", '',
                  f"| strategy | next top-5 | {second} top-5 | next top-1 | {second} top-1 | "
                  f"τ | speedup |", '|---|---|---|---|---|---|---|']
        for row in cell['table']:
            def fmt(col, digits=3):
                if col not in row:
                    return '-'
                spread = f" ± {row[col + '_spread']:.{digits}f}" if n_seeds > 1 else ''
                return f"{row[col]:.{digits}f}{spread}"
            lines.append(f"| {row['strategy']} | {fmt('next_top5')} | {fmt('second_top5')} | "
                         f"{fmt('next_top1')} | {fmt('second_top1')} | {fmt('tau', 2)} | "
                         f"{fmt('speedup', 2)} |")
        if cell['sweep']:
            lines += ['', f"attach_layer sweep (frozen trunk, seed 0), {second}-token top-5: " +
                      ', '.join(f"layer {s['attach_layer']}: {s['second_top5']:.3f}"
                                for s in cell['sweep'])]
        lines.append('')
    return '\n'.join(lines)


def plot_sweep(results, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, cell in results.items():
        if cell['sweep']:
            ax.plot([s['attach_layer'] for s in cell['sweep']],
                    [s['second_top5'] for s in cell['sweep']], marker='o', label=key)
    ax.set_xlabel('attach_layer (trunk blocks before the heads)')
    ax.set_ylabel('2nd-token top-5 accuracy (frozen trunk)')
    ax.set_title('Where should MTP heads branch off?')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_study(cfg, log=print):
    sizes = (QUICK_SIZES if cfg.quick else SIZES)
    size_names = [s for s in cfg.sizes.split(',') if s]
    unknown = [s for s in size_names if s not in sizes]
    if unknown:
        raise UserError(f"unknown sizes {unknown}; choose from {list(sizes)}")
    if cfg.n_future < 2 or cfg.seeds < 1:
        raise UserError("the study needs n_future >= 2 and seeds >= 1")
    t0 = time.time()
    results = {}
    for corpus in [c for c in cfg.corpora.split(',') if c]:
        for size_name in size_names:
            per_seed, sweep = [], []
            for seed in range(cfg.seeds):
                rows, cell_sweep = run_cell(cfg, corpus, size_name, seed, log)
                per_seed.append(rows)
                sweep = sweep or cell_sweep
            n_layer, n_head, n_embd = sizes[size_name]
            results[f"{os.path.basename(corpus).split('.')[0]} / {size_name}"] = dict(
                params=f"{n_layer} layers, {n_embd} dim", seeds=cfg.seeds,
                table=aggregate(per_seed), sweep=sweep)
    results_dir = cfg.results_dir or cfg.out_dir
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, 'study_quick' if cfg.quick else 'study_full')
    text = markdown(results, cfg)
    with open(stem + '.md', 'w') as f:
        f.write(text)
    summary = dict(config=asdict(cfg), results=results, seconds=time.time() - t0,
                   table=stem + '.md', plot=plot_sweep(results, stem + '_layer_sweep.png'))
    with open(stem + '.json', 'w') as f:
        json.dump(summary, f, indent=1)
    return text, summary


def main(argv):
    cfg = parse_flags(argv, StudyConfig())
    if cfg.quick:  # the quick setting, then the flags given
        cfg = parse_flags(argv, replace(StudyConfig(), **QUICK, quick=True))
    text, summary = run_study(cfg)
    print(text)
    print(json.dumps(dict(out_dir=cfg.out_dir, seconds=round(summary['seconds'], 1),
                          table=summary['table'], plot=summary['plot'])))


if __name__ == '__main__':
    cli(main)
