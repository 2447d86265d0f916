"""The paper's study at small scale, one command from corpus to results:

    python study.py --preset=quick --results_dir=results   # the CI-sized smoke, ~12 min on 2 cores
    python study.py --preset=cpu --results_dir=results     # converged models, 3 seeds: ~2 h here
    python study.py                                        # the full setting (bigger: a GPU)
    python study.py --preset=paper --init_from=EleutherAI/pythia-410m --corpora=text.txt  # GPU
    python study.py --preset=pretrain --results_dir=results  # NTP or MTP from scratch? 3 seeds

For every corpus (tiny Shakespeare, open-ended; `counting`, the numbers 1.. in words, nearly
deterministic), size in `sizes` and seed: an NTP base model; FT NTP, the base fine-tuned for as
many iterations as each adaptation gets (no row trains longer), marginalized; the base adapted
to n_future heads by each of the paper's strategies; MTP from scratch for the same total; greedy
decoding with every MTP model. Seed 0 adds the convergence check (a base trained twice as long),
layer probes (probes.py), the size curve over `curve_sizes` (2nd and 3rd token by exact
marginalization vs 3 heads: the paper's Figure 1) and the attach_layer sweep (frozen trunk).
With init_from (--preset=paper) the base is that pretrained model, whose tokenizer reads the
corpus: the paper's Table 1, without runs from scratch, probes, convergence, curve or sweep.
--preset=pretrain (table=pretrain) is the pretraining lab instead: per corpus (tiny Shakespeare;
`python`, the standard library's source), size and seed, NTP and MTP with 4 heads trained from
scratch at the same FLOPs (PRETRAIN: each loss schedule, and block heads), with the NTP runs'
layer probes (run_pretrain_cell).
Results: study_<preset>.md / .json and PNGs (matplotlib optional) in results_dir. Finished runs
and evaluations are reused, so a killed study resumes, and corpora can run in parallel processes
(--corpora=counting & --corpora=shakespeare_char), a last run assembling the report.
"""
import glob
import hashlib
import json
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, asdict, replace
from functools import partial

import torch

from common import (UserError, TrainConfig, flag, parse_flags, pick_device, load_model, cli,
                    load_checkpoint, set_cpu_threads)
from convert import GPT2_SIZES, PYTHIA
from writers import check_writable
from data.text import val_prompts, read_text, token_file, load_meta
from heads import MTPGPT, MTPConfig
from data.prepare import SHAKESPEARE, prepare
import train as trainer
from report import printable
from marginalize import evaluate_table
from probes import layer_probes
from sample import generate, generate_self_speculative
from bench import measure


@dataclass
class StudyConfig:
    """python study.py [--preset=quick|cpu|paper|pretrain] [--name=value ...]
The paper's study at small scale (strategies, marginalization, probes, a size curve), or the
pretraining lab (--preset=pretrain: MTP from scratch against NTP at matched compute)."""
    preset: str = flag('', "quick | cpu | paper | pretrain: its defaults (PRESETS), then flags")
    table: str = flag('strategies', "strategies: adapt NTP bases (the paper) | pretrain: MTP "
                                    "from scratch against NTP at matched compute")
    out_dir: str = flag('out-study', "data, runs and checkpoints")
    results_dir: str = flag('', "study_<preset>.md / .json / *.png (default out_dir)")
    corpora: str = flag('shakespeare_char,counting',
                        "names (shakespeare_char, counting, python) or text files")
    shakespeare: str = flag('', "tiny Shakespeare's text (default: the shipped data/ copy)")
    sizes: str = flag('M,L', "model sizes of the strategies table, see SIZES")
    curve_sizes: str = flag('M,L,XL,XXL', "model sizes of the size curve ('' = none)")
    seeds: int = flag(3, "seeds per (corpus, size) of the strategies table")
    n_future: int = flag(2, "heads of the strategies table's MTP models")
    base_iters: int = flag(3000, "NTP pretraining from scratch")
    base_lr: float = flag(2e-3, "its peak LR (cosine to a tenth)")
    adapt_iters: int = flag(1000, "fine-tuning / each MTP adaptation")
    head_warmup_iters: int = flag(250, "of adapt_iters")
    trunk_lr_scale: float = flag(0.25, "differential LR (Medusa-2: heads 4x the backbone)")
    adapt_lr: float = flag(3e-4, "peak LR of the adaptations")
    batch_size: int = flag(32, "sequences per step")
    block_size: int = flag(128, "context length")
    eval_iters: int = flag(20, "batches per evaluation")
    positions: int = flag(2048, "positions of the strategies table")
    curve_positions: int = flag(512, "positions of the size curve (exact 3rd token: |V|^2 paths)")
    probe_positions: int = flag(8192, "train positions the probes are fit on (val: positions)")
    decode_prompts: int = flag(10, "greedy self-speculative decoding: prompts x new tokens")
    decode_tokens: int = flag(128, "(see decode_prompts)")
    convergence: str = flag('*', "table sizes whose seed-0 base is also trained twice as long to "
                                 "check convergence: '*' all, '' none, or a list")
    sweep: bool = flag(True, "the attach_layer sweep")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    device: str = flag('auto', "auto (cuda > mps > cpu) | cpu | cuda | mps")
    init_from: str = flag('', "a pretrained NTP base instead of training one (paper preset)")
    probes: bool = flag(True, "the layer probes of every base (a probe per layer: |V| wide)")


SIZES = {  # n_layer, n_head, n_embd
    'XXS': (1, 1, 16), 'XS': (1, 2, 32), 'S': (2, 2, 64), 'M': (4, 4, 96), 'L': (6, 6, 192),
    'XL': (8, 8, 256), 'XXL': (12, 12, 384), 'qS': (2, 2, 48)}
PRESETS = {
    'quick': dict(sizes='qS,M', curve_sizes='qS,M', seeds=2, base_iters=500, adapt_iters=150,
                  head_warmup_iters=40, batch_size=16, block_size=64, eval_iters=8, positions=512,
                  curve_positions=64, probe_positions=1024, decode_prompts=4, decode_tokens=64,
                  adapt_lr=1e-3, convergence=''),
    'cpu': dict(sizes='S,M', curve_sizes='XXS,XS,S,M', seeds=3, base_iters=8000, adapt_iters=800,
                head_warmup_iters=200, adapt_lr=1e-3, batch_size=16, block_size=64,
                eval_iters=50, positions=8192, curve_positions=512, probe_positions=8192,
                decode_prompts=20, decode_tokens=32, sweep=False, convergence='S'),
    # the paper's setting: adapt a pretrained Pythia (--init_from) on a real corpus (--corpora);
    # LRs of the paper: 1.5e-4 (410m, 1b), 8e-5 (1.4b), 6e-6 (2.8b). README: cost per size.
    'paper': dict(corpora='', sizes='S', curve_sizes='', seeds=1, adapt_iters=1000,
                  head_warmup_iters=250, adapt_lr=1.5e-4, batch_size=16, block_size=512,
                  eval_iters=20, positions=2048, decode_prompts=10, decode_tokens=128,
                  sweep=False, convergence='', probes=False),
    # the pretraining lab: NTP and MTP from scratch at matched compute, 3 seeds, 2 genres
    'pretrain': dict(table='pretrain', corpora='shakespeare_char,python', sizes='S,M',
                     curve_sizes='', seeds=3, base_iters=2000, batch_size=16, block_size=64,
                     eval_iters=50, positions=4096, probe_positions=8192, decode_prompts=20,
                     decode_tokens=32, sweep=False, convergence=''),
}
STRATEGIES = {  # name -> train.py flags for the adaptation (None: the study's value)
    'heads only (frozen trunk)': dict(freeze_trunk=True),
    'joint fine-tuning': dict(),
    'head warmup': dict(head_warmup_iters=None),
    'diff. LR': dict(trunk_lr_scale=None),
    'head warmup + diff. LR': dict(head_warmup_iters=None, trunk_lr_scale=None),
    'diff. LR + WHS': dict(trunk_lr_scale=None, whs=True),
}
SCRATCH = 'MTP from scratch (same total iters)'
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t_.975
COLUMNS = ('next_top5', 'second_top5', 'next_top1', 'second_top1', 'tau', 'speedup')
EVAL_VERSION = 2  # bump when an evaluation's code changes, so cached results are recomputed


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


def python_text(n_chars=1_000_000):
    """Real code, a genre apart from prose: the Python standard library's own source (this
    interpreter's Lib/*.py by file name, printable ASCII), its first n_chars characters."""
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py'))):
        with open(path, encoding='utf-8', errors='ignore') as f:
            parts.append(''.join(c for c in f.read() if c == '\n' or ' ' <= c <= '~'))
        size += len(parts[-1])
        if size >= n_chars:
            break
    return ''.join(parts)[:n_chars]


GENERATED = {'counting': counting_text, 'python': python_text}  # corpora written here


def prepare_corpus(name, cfg):
    """data dir of a corpus (shakespeare_char, counting, python or a text file), prepared once:
    char-level, or in init_from's tokenizer (GPT-2's BPE, Pythia's, or a checkpoint's own)."""
    tokenizer = 'bpe' if cfg.init_from in GPT2_SIZES else 'char'
    if cfg.init_from.startswith(PYTHIA):
        tokenizer = cfg.init_from
    elif cfg.init_from and tokenizer == 'char':  # a checkpoint: its own tokenizer
        meta = load_checkpoint(cfg.init_from).get('meta') or {}
        if meta.get('kind') not in ('hf', 'bpe'):
            raise UserError(f"init_from={cfg.init_from}: its tokenizer must be bpe or a Hugging "
                            f"Face one (a char vocabulary is fixed by its own corpus)")
        tokenizer = meta.get('name', 'bpe')
    stem = name if name == 'shakespeare_char' or name in GENERATED else os.path.basename(
        name).split('.')[0] + '-' + hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:6]
    data_dir = os.path.join(cfg.out_dir, 'data', stem + (
        '' if tokenizer == 'char' else '-' + slug(tokenizer)))  # (two a.txt: two datasets)
    if os.path.isfile(os.path.join(data_dir, 'meta.json')):
        return data_dir
    path = (cfg.shakespeare or SHAKESPEARE) if name == 'shakespeare_char' else name
    if name == 'shakespeare_char' and not os.path.isfile(path):
        raise UserError(f"tiny Shakespeare not found at {path}: pass --shakespeare=PATH")
    if name not in GENERATED and not os.path.isfile(path):
        raise UserError(f"corpus not found: {name} (use shakespeare_char, counting, python or a "
                        f"text file)")
    try:
        prepare(GENERATED[name]() if name in GENERATED else read_text(path, 'corpus'), data_dir,
                tokenizer)
    except (ValueError, OSError) as e:  # an empty text; a tokenizer that cannot load (offline)
        raise UserError(f"cannot prepare corpus {name} with the {tokenizer} tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return data_dir


def tokens_of(data_dir, split):
    return token_file(os.path.join(data_dir, f'{split}.bin'))


def slug(name):
    return ''.join(c if c.isalnum() else '_' for c in name).strip('_')


# -----------------------------------------------------------------------------
# runs and evaluations, each done once

def run_training(cfg, cell, name, **flags):
    """(checkpoint, summary) of train.train in the cell's folder `name`, with the study's settings.
    From a checkpoint (init_from) it is an adaptation: adapt_iters at adapt_lr unless flags say."""
    if 'init_from' in flags:
        flags = dict(max_iters=cfg.adapt_iters, learning_rate=cfg.adapt_lr,
                     min_lr=cfg.adapt_lr / 10) | flags
    n_layer, n_head, n_embd = SIZES[cell['size']]
    max_iters = flags.get('max_iters', cfg.base_iters)
    run_dir = os.path.join(cell['dir'], name)
    tc = TrainConfig(**dict(
        out_dir=run_dir, data_dir=cell['data_dir'], n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        batch_size=cfg.batch_size, block_size=cfg.block_size, eval_iters=cfg.eval_iters,
        device=cfg.device, seed=cell['seed'], quiet=True, head_type='block', n_future=cfg.n_future,
        learning_rate=cfg.base_lr, min_lr=cfg.base_lr / 10, max_iters=max_iters,
        warmup_iters=min(100, max_iters // 10), eval_interval=max_iters) | flags)
    run = dict(config=asdict(tc), parent=None if tc.init_from == 'scratch' else
               lineage(tc.init_from))
    done = os.path.join(run_dir, 'done.json')
    record = read_json(done)
    if not record or record.get('lineage') != run:  # else: finished earlier, from the same sources
        if record:  # another run's record: it no longer describes ckpt.pt once training starts
            os.remove(done)
        record = dict(lineage=run, summary=printable(trainer.train(tc)))
        write_json(done, record)
    return os.path.join(run_dir, 'ckpt.pt'), record['summary']


def lineage(ckpt):
    """A finished run's config and, recursively, its source's: a run is reused only when its
    whole lineage is unchanged, so a retrained base retrains every run adapted from it."""
    return (read_json(os.path.join(os.path.dirname(ckpt), 'done.json')) or {}).get('lineage')


def read_json(path):
    """A JSON record, or None when it is missing or unreadable (a write cut off by a kill)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    """Write a record atomically (temp file + rename): a killed study never leaves half a one."""
    with open(f"{path}.tmp.{os.getpid()}", 'w') as f:
        json.dump(obj, f)
    os.replace(f"{path}.tmp.{os.getpid()}", path)


def cached(cfg, cell, name, ckpts, compute):
    """compute()'s JSON-able result, stored as <name>.json in the cell's folder; recomputed when
    its key differs: the study's settings, the lineages of the runs ckpts, the code's version."""
    path = os.path.join(cell['dir'], name + '.json')
    key = dict(version=EVAL_VERSION, runs=[lineage(c) for c in ckpts], study={
        k: v for k, v in asdict(cfg).items() if k not in (
            'preset', 'out_dir', 'results_dir', 'corpora', 'sizes', 'curve_sizes', 'seeds',
            'shakespeare', 'threads', 'device')})
    record = read_json(path)
    if not record or record['key'] != key:
        t0 = time.time()
        record = dict(key=key, value=compute())
        write_json(path, dict(record, seconds=time.time() - t0))
    return record['value']


def model_at(ckpt, cfg):
    """A run's model, in eval mode, on the study's device."""
    return load_model(ckpt, pick_device(cfg.device))[0]


def accuracy_rows(model, data_dir, positions, k_ahead, top_ks=()):
    """marginalize.evaluate_table on fixed val positions (seed 0): a row per marginalization
    top_k ('exact': all of V for a char vocabulary, else top_k=50), then the heads' row."""
    exact = 0 if model.config.vocab_size <= 128 else 50
    return evaluate_table(model, tokens_of(data_dir, 'val'), positions=positions, k_ahead=k_ahead,
                          top_ks=[exact if k == 'exact' else k for k in top_ks], seed=0)


def scores(row):
    """next and 2nd (the last head's) token accuracies of a table row."""
    return dict(next_top5=row['top5'][0], next_top1=row['top1'][0],
                second_top5=row['top5'][-1], second_top1=row['top1'][-1])


def decode_speed(model, data_dir, cfg, temperature=0.0):
    """Self-speculative vs vanilla decoding of fixed val prompts as bench.py decode measures it
    (one thread: small models decode latency bound): tau, speedup, identical (greedy: it must
    be; None when sampling)."""
    prompt_len = cfg.block_size // 2
    prompts = val_prompts({}, os.path.join(data_dir, 'val.bin'), cfg.decode_prompts, prompt_len)
    new = min(cfg.decode_tokens, model.config.block_size - prompt_len)
    modes = {'vanilla': lambda prompt, **kw: generate(model, prompt, new, **kw),
             'self': lambda prompt, **kw: generate_self_speculative(model, prompt, new, **kw)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for decode in modes.values():  # warm-up
            decode(prompts[0], temperature=0.0)
        row = measure(modes, prompts, str(next(model.parameters()).device), 1, 0,
                      temperature == 0, temperature=temperature)['self']
    finally:
        torch.set_num_threads(threads)
    return {k: row[k] for k in ('tau', 'speedup', 'identical')}


# -----------------------------------------------------------------------------
# one cell of the strategies table: a corpus, a model size, a seed

def run_cell(cfg, data_dir, size, seed, log, strategies=True):
    """One seed's runs and losses, and (strategies) its table rows: dict(rows, base_loss, ft_loss,
    base, ft, dir, ...). Without strategies only the base and FT NTP (the curve's other sizes)."""
    cell = dict(data_dir=data_dir, size=size, seed=seed, dir=os.path.join(
        cfg.out_dir, 'runs', f"{os.path.basename(data_dir)}-"
        f"{slug(cfg.init_from) if cfg.init_from else size}-s{seed}"))
    train = partial(run_training, cfg, cell)
    # the base: trained here, or (init_from) the pretrained model, saved by one step at LR 1e-30
    # (train.py refuses LR 0): no weight moves by more than 1e-30
    cell['base'], base = train('base', n_future=1, **(dict(
        init_from=cfg.init_from, max_iters=1, learning_rate=1e-30, min_lr=1e-30)
        if cfg.init_from else {}))
    cell['ft'], ft = train('ft', n_future=1, init_from=cell['base'])
    cell.update(base_loss=base['val_loss'], base_train_loss=base['train_loss'],
                ft_loss=ft['val_loss'])
    if not strategies:
        return cell
    runs = {name: train(slug(name), init_from=cell['base'], **{
        k: getattr(cfg, k) if v is None else v for k, v in flags.items()})[0]
        for name, flags in STRATEGIES.items()}
    if not cfg.init_from:  # (from scratch at a pretrained model's size: not here)
        runs[SCRATCH] = train('scratch', max_iters=cfg.base_iters + cfg.adapt_iters)[0]

    def evaluate_cell():
        rows = [dict(strategy="FT NTP + marginalization ({})".format(
            'exact, all V' if row['top_k'] == 0 else f"top_k={row['top_k']}"), **scores(row))
            for row in accuracy_rows(model_at(cell['ft'], cfg), data_dir, cfg.positions,
                                     cfg.n_future, ['exact', 5, 1])]
        for name, ckpt in runs.items():
            model = model_at(ckpt, cfg)
            whs = model.whs_weights()
            heads = accuracy_rows(model, data_dir, cfg.positions, cfg.n_future)[-1]
            rows.append(dict(strategy=name, **scores(heads), **decode_speed(model, data_dir, cfg),
                             whs=None if whs is None else whs.tolist()))
        return rows
    cell['rows'] = cached(cfg, cell, 'eval', [cell['ft'], *runs.values()], evaluate_cell)
    for row in cell['rows']:
        if row.get('whs'):
            row['whs_share'] = whs_share(model_at(runs[row['strategy']], cfg), data_dir, cfg)
    log(f"{os.path.basename(cell['dir'])}: done")
    return cell


@torch.no_grad()
def whs_share(model, data_dir, cfg):
    """What each layer contributes to a WHS head's input: |c_l| * RMS(h_l), normalized to sum
    to 1, per head. The raw coefficients c_l understate or overstate a layer's part, because the
    hidden states' scales differ (h_0, the embeddings, is much smaller than h_L)."""
    tokens = torch.as_tensor(val_prompts({}, os.path.join(data_dir, 'val.bin'), 8,
                                         cfg.block_size), device=next(model.parameters()).device)
    rms = torch.stack([h.pow(2).mean().sqrt() for h in model.trunk(tokens)])
    share = model.whs_weights().abs() * rms
    return (share / share.sum(dim=1, keepdim=True)).tolist()


def run_extras(cfg, cell, curve, in_table, log):
    """Seed 0 of a size: the convergence check and the attach_layer sweep (table sizes), the
    probes, a size curve point."""
    train, base, extras = partial(run_training, cfg, cell), cell['base'], {}
    data_dir = cell['data_dir']
    if in_table and (cfg.convergence == '*' or cell['size'] in cfg.convergence.split(',')):
        loss = train('base_2x', n_future=1, max_iters=2 * cfg.base_iters)[1]['val_loss']
        extras['convergence'] = dict(base_2x_loss=loss, gain_2x=cell['base_loss'] - loss)
    if cfg.probes:
        extras['probes'] = cached(cfg, cell, 'probes', [base], lambda: layer_probes(
            model_at(base, cfg), tokens_of(data_dir, 'train'), tokens_of(data_dir, 'val'),
            cfg.probe_positions, cfg.positions))
    if curve:
        joint3 = train('joint3', n_future=3, init_from=base)[0]

        def curve_point():
            ft_model = model_at(cell['ft'], cfg)
            marginal = accuracy_rows(ft_model, data_dir, cfg.curve_positions, 3, ['exact'])[0]
            heads = accuracy_rows(model_at(joint3, cfg), data_dir, cfg.curve_positions, 3)[-1]
            return dict(params=ft_model.num_params(), marginal=marginal, heads=heads)
        extras['curve'] = cached(cfg, cell, 'curve', [cell['ft'], joint3], curve_point)
    if cfg.sweep and in_table:
        extras['sweep'] = []
        for layer in range(SIZES[cell['size']][0]):
            ckpt = train(f'attach{layer}', init_from=base, attach_layer=layer, freeze_trunk=True)[0]
            row = cached(cfg, cell, f'attach{layer}', [ckpt], lambda: accuracy_rows(
                model_at(ckpt, cfg), data_dir, cfg.positions, cfg.n_future)[-1])
            extras['sweep'].append(dict(attach_layer=layer, **scores(row)))
    log(f"{os.path.basename(cell['dir'])}: extras done")
    return extras


# -----------------------------------------------------------------------------
# the pretraining lab (table=pretrain): MTP from scratch against NTP, at matched compute

PRETRAIN = {  # name -> train.py flags of a run from scratch
    'NTP': dict(n_future=1),
    'MTP 4 sequential, constant': dict(n_future=4, head_type='sequential'),
    'MTP 4 sequential, geometric': dict(n_future=4, head_type='sequential', mtp_decay=0.5),
    'MTP 4 sequential, curriculum': dict(n_future=4, head_type='sequential',
                                         loss_schedule='curriculum'),
    'MTP 4 sequential, shrinking': dict(n_future=4, head_type='sequential',
                                        loss_schedule='shrink'),
    'MTP 4 block, constant': dict(n_future=4, head_type='block'),
}
LAB_COLUMNS = ('iters', 'ms_per_iter', 'val_loss', 'top1', 'tau', 'speedup', 'tau_sampled',
               'speedup_sampled')  # in the order of the report's columns


def run_pretrain_cell(cfg, data_dir, size, seed, log):
    """One seed's runs from scratch, each for the iterations that spend the FLOPs of base_iters
    NTP iterations (MTPGPT.flops_per_token at every head: a schedule's skipped heads are not
    refunded), and per run: head 1's val loss and top-1, tau and speedup of greedy and T = 0.8
    self-speculative decoding, ms per iteration, and its val loss at each evaluation against the
    FLOPs spent. Then the NTP run's layer probes. Returns (rows, probes)."""
    cell = dict(data_dir=data_dir, size=size, seed=seed, dir=os.path.join(
        cfg.out_dir, 'runs', f"{os.path.basename(data_dir)}-pretrain-{size}-s{seed}"))
    shape = dict(zip(('n_layer', 'n_head', 'n_embd'), SIZES[size]))
    flops = {name: MTPGPT(MTPConfig(  # per iteration
        vocab_size=load_meta(data_dir)['vocab_size'], block_size=cfg.block_size, **shape,
        n_future=flags['n_future'], head_type=flags.get('head_type', 'block'))
    ).flops_per_token(cfg.block_size) * cfg.batch_size * cfg.block_size
        for name, flags in PRETRAIN.items()}
    rows, ckpts = [], {}
    for name, flags in PRETRAIN.items():
        iters = round(cfg.base_iters * flops['NTP'] / flops[name])
        ckpts[name], run = run_training(cfg, cell, slug(name), max_iters=iters,
                                        eval_interval=max(1, iters // 10), **flags)
        head1 = run['val_heads'][0]
        row = dict(strategy=name, iters=iters, ms_per_iter=run['ms_per_iter'],
                   val_loss=head1['loss'], top1=head1['top1'],
                   curve=[(e['iter'] * flops[name], e['val']['heads'][0]['loss'])
                          for e in run['evals']])
        if flags['n_future'] > 1:
            row.update(cached(cfg, cell, slug(name) + '-decode', [ckpts[name]], lambda: {
                k + suffix: v for t, suffix in ((0.0, ''), (0.8, '_sampled'))  # greedy, T = 0.8
                for k, v in decode_speed(model_at(ckpts[name], cfg), data_dir, cfg, t).items()}))
        rows.append(row)
    probes = cached(cfg, cell, 'probes', [ckpts['NTP']], lambda: layer_probes(
        model_at(ckpts['NTP'], cfg), tokens_of(data_dir, 'train'), tokens_of(data_dir, 'val'),
        cfg.probe_positions, cfg.positions))
    log(f"{os.path.basename(cell['dir'])}: done")
    return rows, probes


def peaks(probes):
    """Per seed, for x_{t+1} and x_{t+2}: the layer where the probe's top-1 peaks, and top-1 at
    the last layer minus the best below it (< 0: the token is read better below the top)."""
    result = []
    for p in probes:
        top1 = p['probe']['top1']
        result.append(dict(best=[max(p['layers'], key=lambda layer: top1[k][layer])
                                 for k in (0, 1)],
                           last_minus_below=[top1[k][-1] - max(top1[k][:-1]) for k in (0, 1)]))
    return result


def markdown_pretrain(results, cfg):
    lines = ['## MTP from scratch against NTP, at matched compute', '',
             f"Every run is charged the FLOPs of {cfg.base_iters} NTP iterations at every head (an "
             f"MTP run gets fewer iterations; a schedule's skipped heads are not refunded, so "
             f"curriculum and shrinking runs spend less), batch {cfg.batch_size} x "
             f"{cfg.block_size} tokens; the python corpus is Python {sys.version.split()[0]}'s "
             f"standard library. Head 1's val "
             f"loss and top-1 on {cfg.eval_iters} fixed val batches; Δ: minus NTP of the same "
             f"seed, mean [95% t interval]; τ and speedup of self-speculative decoding (greedy "
             f"and T = 0.8), one thread. Mean ± half-range over seeds.", '']
    for key, cell in results['pretrain'].items():
        deltas = {row['strategy']: row for row in cell['paired']}
        lines += [f"**{key}** ({cell['params']}, {cell['seeds']} seeds)", '',
                  '| run | iters | ms/iter | head-1 val loss | Δ loss | top-1 | Δ top-1 | τ | '
                  'speedup | τ T=0.8 | speedup T=0.8 |', '|---|' + '---|' * 10]
        for row in cell['table']:
            d = deltas.get(row['strategy'])
            cells = [fmt(row[c], row[c + '_spread'], 0 if c in ('iters', 'ms_per_iter') else 3)
                     if c in row else '-' for c in LAB_COLUMNS]
            for i, col in ((3, 'val_loss'), (5, 'top1')):
                cells.insert(i, '-' if d is None else interval(d[col]['mean'], d[col]['ci95']))
            lines.append(f"| {row['strategy']} | " + ' | '.join(cells) + ' |')
        late = '; '.join(f"{runs[0]['strategy']} " + ', '.join(
            f"{statistics.fmean(at_fraction(r['curve'], f) for r in runs):.3f}"
            for f in (0.6, 0.8, 1.0)) for runs in zip(*cell['per_seed']))
        lines += ['', "Greedy self-speculative output identical to vanilla: " + (
            'yes, every run and seed' if all(r['identical'] for r in cell['table']) else 'NO'), '',
                  f"Converged? Head-1 val loss at 60%, 80% and 100% of each run's FLOPs (the "
                  f"nearest evaluation), seed mean: {late}.", '']
    lines += ['## Where the layers read the next tokens', '',
              'Linear probes of every layer of the NTP runs (layer 0: the embeddings), every '
              'seed: the layer where top-1 peaks for x_{t+1} and x_{t+2}, and top-1 at the last '
              'layer minus the best layer below it (mean [95% t interval]; < 0: read better '
              'below the top).', '',
              '| corpus / size | layers | x_{t+1} peaks at | x_{t+2} peaks at | last minus below, '
              'x_{t+1} | last minus below, x_{t+2} |', '|---|---|---|---|---|---|']
    for key, cell in results['pretrain'].items():
        found = peaks(cell['probes'])
        diffs = [[f['last_minus_below'][k] for f in found] for k in (0, 1)]
        lines.append(f"| {key} | 0..{cell['probes'][0]['layers'][-1]} | " + ' | '.join(
            ', '.join(str(f['best'][k]) for f in found) for k in (0, 1)) + ' | ' + ' | '.join(
            interval(statistics.fmean(d), ci95(d)) for d in diffs) + ' |')
    return lines + ['']


def at_fraction(curve, fraction):
    """The val loss of the evaluation nearest to fraction of a run's FLOPs; curve: [(FLOPs,
    loss)], the last at the run's end."""
    return min(curve, key=lambda point: abs(point[0] - fraction * curve[-1][0]))[1]


def ci95(values):
    """Half-width of the 95% t interval of the mean of values (Student's t, n - 1 dof)."""
    n = len(values)
    return T95.get(n - 1, 1.96) * statistics.stdev(values) / n ** 0.5 if n > 1 else 0.0


def interval(mean, half):
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


# -----------------------------------------------------------------------------
# statistics over seeds, and the report

def spread(values):
    """(mean, half the max-min range) of a list of numbers."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def aggregate(rows_per_seed, columns=COLUMNS):
    """Mean and spread over seeds, row by row; the WHS mix's mean."""
    table = []
    for rows in zip(*rows_per_seed):
        entry = dict(strategy=rows[0]['strategy'])
        for col in columns:
            values = [r[col] for r in rows if r.get(col) is not None]
            if values:
                entry[col], entry[col + '_spread'] = spread(values)
        entry['identical'] = all(r.get('identical', True) for r in rows)
        if rows[0].get('whs'):
            entry['whs'] = torch.tensor([r['whs'] for r in rows]).mean(0).tolist()
        table.append(entry)
    return table


def paired(rows_per_seed, reference='joint fine-tuning', cols=('second_top1', 'second_top5')):
    """Every row minus the reference row of the same seed (the seeds pair them), per column: the
    differences, their mean, sd and the half-width of its 95% CI (Student's t, n - 1 dof)."""
    refs = [next(r for r in rows if r['strategy'] == reference) for rows in rows_per_seed]
    result = []
    for rows in zip(*rows_per_seed):
        if rows[0]['strategy'] == reference:
            continue
        entry = dict(strategy=rows[0]['strategy'])
        for col in cols:
            diffs = [row[col] - ref[col] for row, ref in zip(rows, refs)]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            entry[col] = dict(diffs=diffs, mean=statistics.fmean(diffs), sd=sd, ci95=ci95(diffs))
        result.append(entry)
    return result


def fmt(mean, half=None, digits=3):
    return f"{mean:.{digits}f}" + ('' if half is None else f" ± {half:.{digits}f}")


def markdown_strategies(key, cell):
    n = cell['seeds']
    lines = [f"**{key}** ({cell['params']}, {n} seed{'s' * (n > 1)}, mean ± half-range)", '',
             '| strategy | next top-5 | 2nd top-5 | next top-1 | 2nd top-1 | τ | speedup |',
             '|---|---|---|---|---|---|---|']
    for row in cell['table']:
        cells = [fmt(row[c], row[c + '_spread'] if n > 1 else None, 2 if c in ('tau', 'speedup')
                     else 3) if c in row else '-' for c in COLUMNS]
        lines.append(f"| {row['strategy']} | " + ' | '.join(cells) + ' |')
    same = all(row['identical'] for row in cell['table'])
    lines += ['', f"Greedy self-speculative output identical to vanilla: "
              f"{'yes, every model and seed' if same else 'NO (a bug)'}."]
    for rows in zip(*cell['per_seed']):
        if rows[0].get('whs'):
            lines += ['', f"WHS of {rows[0]['strategy']}, per head (h_0 .. h_attach), each seed: "
                      f"coefficients c_l; share |c_l| RMS(h_l) / sum:"] + [
                f"- seed {seed}: " + '; '.join(
                    f"head {k + 1}: c = " + ' '.join(f"{c:.3f}" for c in mix) + ", share = " +
                    ' '.join(f"{c:.3f}" for c in share)
                    for k, (mix, share) in enumerate(zip(row['whs'], row['whs_share'])))
                for seed, row in enumerate(rows)]
    next_rows = [r for r in cell['paired_next'] if not r['strategy'].startswith('FT NTP')]
    for title, table, col, label in (
            ('2nd token, every row minus joint fine-tuning', cell['paired'], 'second', '2nd'),
            ('next token, every MTP model minus FT NTP', next_rows, 'next', 'next')):
        if table:
            lines += ['', f"Paired differences, {title}, same seed: mean [95% CI, t over seeds]; "
                      f"per seed:", '', f"| row | Δ {label} top-1 | per seed | Δ {label} top-5 | "
                      f"per seed |", '|---|---|---|---|---|']
            for row in table:
                cells = []
                for d in (row[f'{col}_top1'], row[f'{col}_top5']):
                    cells += [interval(d['mean'], d['ci95']),
                              ' '.join(f"{x:+.3f}" for x in d['diffs'])]
                lines.append(f"| {row['strategy']} | " + ' | '.join(cells) + ' |')
    if cell.get('sweep'):
        lines += ['', "attach_layer sweep (frozen trunk, seed 0), 2nd-token top-5: " + ', '.join(
            f"layer {s['attach_layer']}: {s['second_top5']:.3f}" for s in cell['sweep'])]
    return lines + ['']


def markdown(results, cfg, command, seconds):
    head = (f"Study preset `{cfg.preset or 'full'}`: `{command}`; compute {seconds / 60:.1f} min "
            f"(training and evaluation, summed over processes).")
    if cfg.table == 'pretrain':
        return '\n'.join([head, ''] + markdown_pretrain(results, cfg))
    new = min(cfg.decode_tokens, cfg.block_size - cfg.block_size // 2)
    lines = [f"{head} Base models {cfg.base_iters} iters, each adaptation {cfg.adapt_iters}, "
             f"block {cfg.block_size}, batch {cfg.batch_size}; {cfg.n_future} heads; accuracies "
             f"on {cfg.positions} val positions (the same for every row and seed); τ / speedup: "
             f"greedy decoding of {cfg.decode_prompts} val prompts x {new} new tokens, one "
             f"thread.", '',
             '## Convergence', '', 'Val loss of the base models (mean ± half-range over seeds; '
             'train loss beside it), after FT NTP, and of a seed-0 base trained twice as long:', '',
             '| corpus / size | base val | base train | FT NTP val | base, 2x iters | 2x gains |',
             '|---|---|---|---|---|---|']
    for key, c in results['convergence'].items():
        longer = f"{c['base_2x_loss']:.3f} | {c['gain_2x']:+.3f}" if 'gain_2x' in c else '- | -'
        lines.append(f"| {key} | {fmt(*spread(c['base']))} | {fmt(*spread(c['base_train']))} | "
                     f"{fmt(*spread(c['ft']))} | {longer} |")
    lines += ['', '## Strategies', '']
    for key, cell in results['cells'].items():
        lines += markdown_strategies(key, cell)
    lines += ['## Layer probes', ''] if results['probes'] else []
    for key, p in results['probes'].items():
        lines += [f"**{key}**, base model, seed 0, {p['positions']} val positions (top-1 / top-5):",
                  '', '| layer | lens x_{t+1} | lens x_{t+2} | probe x_{t+1} | probe x_{t+2} |',
                  '|---|---|---|---|---|']
        for layer in p['layers']:
            lines.append(f"| {layer} | " + ' | '.join(
                f"{p[r]['top1'][k][layer]:.3f} / {p[r]['top5'][k][layer]:.3f}"
                for r in ('lens', 'probe') for k in (0, 1)) + ' |')
        best = peaks([p])[0]['best']
        lines += ['', f"Best layer by the linear probe (top-1): x_{{t+1}} at {best[0]}, "
                      f"x_{{t+2}} at {best[1]} (last layer: {p['layers'][-1]}).", '']
    if results['curve']:
        lines += ['## Size curve (seed 0)', '',
                  '| corpus | size | params | next top-1 | 2nd: marginal / heads | 3rd: marginal / '
                  'heads | 2nd top-5: marginal / heads | 3rd top-5: marginal / heads |',
                  '|---|---|---|---|---|---|---|---|']
        for corpus, points in results['curve'].items():
            for size, p in sorted(points.items(), key=lambda item: item[1]['params']):
                m, h = p['marginal'], p['heads']
                lines.append(f"| {corpus} | {size} | {p['params'] / 1e6:.2f}M | "
                             f"{m['top1'][0]:.3f} | " + ' | '.join(
                                 f"{m[t][k]:.3f} / {h[t][k]:.3f}"
                                 for t in ('top1', 'top5') for k in (1, 2)) + ' |')
        lines.append('')
    return '\n'.join(lines)


def plots(results, stem):
    """PNG paths: the size curve, the probes and the pretraining lab's val loss per corpus."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figures = {}  # path -> (figure, axes)
    for corpus, points in results['curve'].items():
        fig, ax = figures[f"{stem}_size_curve_{corpus}.png"] = plt.subplots(figsize=(6, 4))
        points = sorted(points.values(), key=lambda p: p['params'])  # smallest model first
        for label, method, k in (
                ('next token', 'marginal', 0), ('2nd, marginalization', 'marginal', 1),
                ('2nd, heads', 'heads', 1), ('3rd, marginalization', 'marginal', 2),
                ('3rd, heads', 'heads', 2)):
            ax.plot([p['params'] for p in points], [p[method]['top1'][k] for p in points],
                    marker='o', label=label)
        ax.set(xscale='log', xlabel='parameters', ylabel='top-1 accuracy', title=corpus)
        ax.legend(fontsize=8)
    for corpus in sorted({key.split(' / ')[0] for key in results['probes']}):
        fig, axes = figures[f"{stem}_probes_{corpus}.png"] = plt.subplots(1, 2, figsize=(10, 4))
        for key, p in results['probes'].items():
            if key.startswith(corpus + ' / '):
                depth = [layer / p['layers'][-1] for layer in p['layers']]
                for k, ax in enumerate(axes):
                    line, = ax.plot(depth, p['probe']['top1'][k], marker='o', label=f"{key} probe")
                    ax.plot(depth, p['lens']['top1'][k], ls='--', color=line.get_color(),
                            label=f"{key} lens")
        for k, ax in enumerate(axes):
            ax.set(xlabel='layer / L (0 = embeddings)', ylabel='top-1',
                   title=f"{corpus}: x_{{t+{k + 1}}} from each layer")
            ax.legend(fontsize=7)
    for corpus in sorted({key.split(' / ')[0] for key in results['pretrain']}):
        keys = [key for key in results['pretrain'] if key.startswith(corpus + ' / ')]
        fig, axes = figures[f"{stem}_{corpus}.png"] = plt.subplots(
            1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for runs in zip(*results['pretrain'][key]['per_seed']):  # one run, every seed
                flops = [point[0] for point in runs[0]['curve']]
                ax.plot(flops, [statistics.fmean(r['curve'][i][1] for r in runs)
                                for i in range(len(flops))], marker='.', label=runs[0]['strategy'])
            ax.set(xscale='log', xlabel='training FLOPs', ylabel='head-1 val loss, seed mean',
                   title=key)
            ax.legend(fontsize=7)
    for path, (fig, _) in figures.items():
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return list(figures)


# -----------------------------------------------------------------------------

def check_study_config(cfg):
    unknown = [s for s in f"{cfg.sizes},{cfg.curve_sizes}".split(',') if s and s not in SIZES]
    if unknown:
        raise UserError(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    corpora = [c for c in cfg.corpora.split(',') if c]
    if len(set(corpora)) < len(corpora):
        raise UserError(f"a corpus is listed twice in --corpora={cfg.corpora}")
    if cfg.table not in ('strategies', 'pretrain'):
        raise UserError(f"table must be strategies or pretrain, not {cfg.table!r}")
    if cfg.table == 'pretrain' and cfg.init_from:
        raise UserError("--table=pretrain trains every model from scratch: drop --init_from")
    if cfg.n_future < 2 or cfg.seeds < 1:
        raise UserError("the study needs n_future >= 2 and seeds >= 1")
    if not corpora or not [s for s in cfg.sizes.split(',') if s]:
        raise UserError("no corpora or no sizes given: " + (
            "--corpora=<a text file> (the paper adapts a pretrained model on real text)"
            if cfg.preset == 'paper' else "--corpora=shakespeare_char,counting --sizes=S,M"))
    if cfg.init_from and (cfg.curve_sizes or cfg.sweep or cfg.convergence or ',' in cfg.sizes):
        raise UserError("init_from adapts one pretrained model: use one --sizes entry (a label "
                        "only), --curve_sizes= --sweep=false --convergence= (as --preset=paper)")
    check_writable(cfg.out_dir, 'out_dir')  # (before the compute, not after it)
    check_writable(cfg.results_dir or cfg.out_dir, 'results_dir')
    if cfg.preset == 'paper' and not cfg.init_from:
        raise UserError("--preset=paper adapts a pretrained model: add --init_from=EleutherAI/"
                        "pythia-410m (or another) and --corpora=<text file>")


def run_corpus(cfg, corpus, results, log):
    data_dir = prepare_corpus(corpus, cfg)
    name = os.path.basename(corpus).split('.')[0]
    if name in {key.split(' / ')[0] for table in results.values() for key in table}:
        name = os.path.basename(data_dir)  # (two a.txt: keyed by their data dirs, a-<hash>)
    sizes = [s for s in cfg.sizes.split(',') if s]
    if cfg.table == 'pretrain':
        for size in sizes:
            cells = [run_pretrain_cell(cfg, data_dir, size, seed, log) for seed in range(cfg.seeds)]
            rows = [rows for rows, _ in cells]
            results['pretrain'][f"{name} / {size}"] = dict(
                params=f"{SIZES[size][0]} layers, {SIZES[size][2]} dim", seeds=cfg.seeds,
                table=aggregate(rows, LAB_COLUMNS), per_seed=rows, probes=[p for _, p in cells],
                paired=paired(rows, 'NTP', ('val_loss', 'top1')) if cfg.seeds > 1 else [])
        return
    curve_sizes = [s for s in cfg.curve_sizes.split(',') if s]
    for size in sizes + [s for s in curve_sizes if s not in sizes]:
        in_table = size in sizes
        cells = [run_cell(cfg, data_dir, size, seed, log, in_table)
                 for seed in range(cfg.seeds if in_table else 1)]
        extras = run_extras(cfg, cells[0], size in curve_sizes, in_table, log)
        key = f"{name} / {cfg.init_from or size}"
        if 'curve' in extras:
            results['curve'].setdefault(name, {})[size] = extras.pop('curve')
        if 'probes' in extras:
            results['probes'][key] = extras.pop('probes')
        results['convergence'][key] = dict({k: [c[k + '_loss'] for c in cells] for k in (
            'base', 'base_train', 'ft')}, **extras.pop('convergence', {}))
        if in_table:  # paired_next's reference: FT NTP at its largest top_k (all V, or 50)
            rows, many = [c['rows'] for c in cells], cfg.seeds > 1
            results['cells'][key] = dict(
                params=f"{SIZES[size][0]} layers, {SIZES[size][2]} dim" if not cfg.init_from
                else f"pretrained {cfg.init_from}", seeds=cfg.seeds, table=aggregate(rows),
                paired=paired(rows) if many else [],
                paired_next=paired(rows, rows[0][0]['strategy'], ('next_top1', 'next_top5'))
                if many else [], per_seed=rows, **extras)


def run_study(cfg, log=print, command='python study.py'):
    check_study_config(cfg)
    set_cpu_threads(cfg.threads)
    t0 = time.time()
    results = dict(cells={}, curve={}, probes={}, convergence={}, pretrain={})
    for corpus in [c for c in cfg.corpora.split(',') if c]:
        run_corpus(cfg, corpus, results, log)
    results_dir = cfg.results_dir or cfg.out_dir
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, f"study_{cfg.preset or 'full'}")
    seconds = 0.0  # of training and evaluation: every run and evaluation on disk
    for root, _, files in os.walk(os.path.join(cfg.out_dir, 'runs')):
        for record in [read_json(os.path.join(root, n)) for n in files if n.endswith('.json')]:
            if record:
                seconds += record.get('seconds') or record.get('summary', {}).get('time_s') or 0
    text = markdown(results, cfg, command, seconds)
    with open(stem + '.md', 'w') as f:
        f.write(text)
    summary = dict(config=asdict(cfg), command=command, results=results, compute_s=seconds,
                   seconds=time.time() - t0, table=stem + '.md', plots=plots(results, stem))
    with open(stem + '.json', 'w') as f:
        json.dump(summary, f, indent=1)
    return text, summary


def main(argv):
    preset = parse_flags([a for a in argv if a not in ('--help', '-h')], StudyConfig()).preset
    if preset and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    # the preset's defaults, then the flags given (--help shows the preset's defaults)
    cfg = parse_flags(argv, replace(StudyConfig(), **PRESETS.get(preset, {}), preset=preset))
    text, summary = run_study(cfg, command=' '.join(['python study.py', *argv]))
    print(text)
    print(json.dumps(dict(out_dir=cfg.out_dir, seconds=round(summary['seconds'], 1),
                          compute_s=round(summary['compute_s'], 1), table=summary['table'],
                          plots=summary['plots'])))


if __name__ == '__main__':
    cli(main)
