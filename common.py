"""The plumbing every nanoMTP script shares: flags (and --help; the flag sets of training,
decoding and marginalization), devices, checkpoints and cli() (a UserError ends a script with one
line). Imports: model <- heads, writers <- common <- data/ <- metrics, report <- scripts."""
import ast
import dataclasses
import inspect
import os
import shutil
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import UserError
from convert import GPT2_SIZES, PYTHIA, from_pretrained
from heads import MTPGPT, MTPConfig
from writers import remove_stale_temps, check_file


# -----------------------------------------------------------------------------
# flags: defaults < preset files < --name=value (nanoGPT's convention)

def _convert(name, value, default):
    """`value` (a command-line string or a preset's literal) with the type of `default`."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        bools = {'true': True, '1': True, 'false': False, '0': False}
        try:
            return bools[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise UserError(f"--{name} expects {kind.__name__}, got {value!r}")
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise UserError(f"{name} expects {kind.__name__}, got {value!r}")
    return kind(value)


def read_preset(path):
    """[(name, value, where)] from a preset file of `name = value` lines (Python literals)."""
    check_file(path, 'preset file')
    try:
        nodes = ast.parse(open(path).read(), path).body
        for node in nodes:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                raise ValueError(f"line {node.lineno} is not `name = value`")
        return [(node.targets[0].id, ast.literal_eval(node.value), f"{path}:{node.lineno}")
                for node in nodes]
    except (SyntaxError, ValueError) as e:
        raise UserError(f"cannot read preset {path}: {e}")


def parse_flags(argv, defaults, presets=False, fixed=()):
    """`defaults` (a config dataclass) updated from preset files (if `presets`), then from
    `--name=value` flags (a bare --name sets a bool; `fixed` names are not flags). .given: what
    was set (train.py: a resumed run takes the rest from its run)."""
    values = {k: v for k, v in dataclasses.asdict(defaults).items() if k not in fixed}
    if '--help' in argv or '-h' in argv:
        print(help_text(defaults, values))
        sys.exit(0)
    preset_items, flag_items = [], []
    for arg in argv:
        if arg.startswith('--'):
            name, eq, value = arg[2:].partition('=')
            if not eq and type(values.get(name)) is not bool:
                raise UserError(f"expected --name=value, got {arg!r}")
            flag_items.append((name, value if eq else 'true', arg))
        elif presets:
            preset_items += read_preset(arg)
        else:
            raise UserError(f"unexpected argument {arg!r}; expected --name=value")
    for name, value, where in preset_items + flag_items:  # flags win over presets
        if name not in values:
            raise UserError(f"unknown option {name!r} ({where}); valid: {', '.join(values)}")
        values[name] = _convert(name, value, values[name])
    config = dataclasses.replace(defaults, **values)
    config.given = frozenset(name for name, _, _ in preset_items + flag_items)
    return config


def flag(default, description):
    """A field of a config dataclass: its default and what --help says about it."""
    return dataclasses.field(default=default, metadata={'help': description})


def help_text(defaults, values):
    """The --help page: the config class's docstring, then every flag."""
    docs = {f.name: f.metadata.get('help', '') for f in dataclasses.fields(defaults)}
    shown = {k: v if not isinstance(v, str) or v.isprintable() else repr(v)
             for k, v in values.items()}
    width = max(len(f"--{k}={v}") for k, v in shown.items())
    lines = [inspect.getdoc(type(defaults)) or '', '', 'flags (--name=value):']
    lines += [f"  {f'--{k}={v}':{width}}  {docs.get(k, '')}".rstrip() for k, v in shown.items()]
    return '\n'.join(lines)


def check_ranges(args, positive=(), non_negative=(), fractions=()):
    for keys, ok, rule in ((fractions, lambda v: 0 < v <= 1, 'in (0, 1]'),
                           (positive, lambda v: v >= 1, '>= 1'),
                           (non_negative, lambda v: v >= 0, '>= 0')):
        for key in keys:
            if not ok(getattr(args, key)):
                raise UserError(f"--{key} must be {rule}, got {getattr(args, key)}")


@dataclasses.dataclass
class MarginalizeFlags:
    """The flags of a marginalization run (marginalize.py's table, bench.py marginalize)."""
    ckpt: str = flag('', "checkpoint path (or gpt2 / ... / EleutherAI/pythia-*); required")
    input: str = flag('', "a text file to evaluate on, instead of the dataset's val.bin")
    data_dir: str = flag('', "override the checkpoint's data dir (data/<dataset>)")
    positions: int = flag(256, "how many positions t to evaluate")
    k_ahead: int = flag(3, "predict x_{t+1} .. x_{t+k_ahead}")
    top_k: str = flag('', "comma list of marginalization settings, 'all' = all of V; '' = "
                          "1,2,5,10,50 (and all if V <= 128)")
    top_p: float = flag(1.0, "nucleus of every step's candidates (1 = off)")
    max_paths: int = flag(0, "at most this many paths per position (0 = no cap)")
    chunk_size: int = flag(512, "tokens per batched forward")
    window: int = flag(0, "tokens per window (0 = block_size)")
    max_forward_tokens: int = flag(100_000_000, "refuse a setting whose paths need more (all of a "
                                                "BPE vocabulary at k_ahead=3: ~1e10 per position)")
    max_seconds: float = flag(3600.0, "refuse a setting that a timed probe says takes longer")
    seed: int = flag(0, "which windows")
    device: str = flag('auto', "auto (cuda > mps > cpu) | cpu | cuda | ...")


@dataclasses.dataclass
class TrainConfig:
    """python train.py [preset.py ...] [--name=value ...]
Train a GPT with MTP heads from scratch, adapt a trained model to MTP, or resume a run."""
    given = frozenset()  # (not a flag) what parse_flags was given; a config built in code: none
    # I/O
    out_dir: str = flag('out', "checkpoints go to out_dir/ckpt.pt")
    dataset: str = flag('shakespeare_char', "reads data/<dataset>/{train,val}.bin and meta.json")
    data_dir: str = flag('', "overrides data/<dataset>")
    init_from: str = flag('scratch', "scratch | resume | a ckpt path | gpt2* | EleutherAI/pythia-*")
    eval_interval: int = flag(500, "iterations between evaluations (and checkpoints)")
    eval_iters: int = flag(20, "batches per split per evaluation")
    log_interval: int = flag(10, "iterations between progress-bar updates")
    # data
    batch_size: int = flag(8, "sequences per micro-batch")
    block_size: int = flag(256, "context length (tokens per training window)")
    grad_accum: int = flag(1, "micro-batches per optimizer step (split across ranks)")
    doc_len: int = flag(0, "> 0: the corpus is documents of doc_len tokens (distill.py)")
    doc_prompt: int = flag(0, "... whose first doc_prompt tokens are never targets")
    # model (ignored when adapting a checkpoint: the source decides)
    n_layer: int = flag(4, "transformer blocks on the next-token path")
    n_head: int = flag(4, "attention heads per block")
    n_embd: int = flag(128, "channels")
    dropout: float = flag(0.0, "dropout probability (0 for small data and fine-tuning)")
    bias: bool = flag(False, "biases in Linear and LayerNorm layers")
    # multi-token prediction
    n_future: int = flag(4, "heads; head k predicts x_{t+k}")
    attach_layer: int = flag(-1, "trunk depth; -1 = n_layer-1 (block heads), else n_layer")
    head_type: str = flag('sequential', "sequential (DeepSeek-V3) | resblock (Medusa) | block")
    whs: bool = flag(False, "weighted hidden states: heads read a learned mix of layers")
    head_attention: bool = flag(False, "sequential heads: an MLP (Hydra), or a transformer block")
    loss_weights: str = flag('', "explicit lambda_1..lambda_n, comma separated")
    mtp_weight: float = flag(1.0, "else lambda_1 = 1, lambda_k = mtp_weight * mtp_decay^(k-2)")
    mtp_decay: float = flag(1.0, "(see mtp_weight; 0.5: the geometric 1, 1/2, 1/4, ...)")
    loss_schedule: str = flag('constant', "the weights over training: constant | curriculum "
                                          "(NTP first) | shrink (heads out at the end)")
    schedule_frac: float = flag(0.25, "the fraction of max_iters a schedule's ramp takes")
    memory_efficient: bool = flag(False, "heads' forward+backward one at a time")
    # training strategies of the paper (for adapted models), see training_strategy()
    freeze_trunk: bool = flag(False, "heads only")
    head_warmup_iters: int = flag(0, "heads only for this many iterations, then joint")
    trunk_lr_scale: float = flag(1.0, "differential LR: trunk LR = scale * head LR")
    # optimizer and schedule
    learning_rate: float = flag(2e-3, "peak LR (of the heads, with differential LR)")
    max_iters: int = flag(3500, "total iterations (a resumed run continues to this)")
    weight_decay: float = flag(0.1, "AdamW's, on matrices only")
    beta1: float = flag(0.9, "AdamW's beta1")
    beta2: float = flag(0.99, "AdamW's beta2")
    grad_clip: float = flag(1.0, "max gradient norm; 0 disables")
    warmup_iters: int = flag(100, "linear LR warmup")
    lr_decay_iters: int = flag(-1, "cosine decay to min_lr until here; -1: max_iters")
    min_lr: float = flag(2e-4, "the LR after the decay")
    # system
    device: str = flag('auto', "auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps")
    dtype: str = flag('auto', "auto (bfloat16 on CUDA, else float32) | float32 | bfloat16")
    compile: bool = flag(False, "torch.compile the model")
    seed: int = flag(1337, "of the init and the batches (rank r uses seed + r)")
    quiet: bool = flag(False, "no progress bar / log lines (the JSON line still prints)")


def parse_config(argv, base=None):
    """TrainConfig from ['preset.py', '--max_iters=100']: defaults < presets < flags."""
    return parse_flags(argv, base or TrainConfig(), presets=True)


# TrainConfig's flags that are the model's (a resumed or adapted run's model decides them)
SHAPE = ('n_layer', 'n_head', 'n_embd', 'bias')  # what a source checkpoint decides
MODEL = SHAPE + ('n_future', 'attach_layer', 'head_type', 'whs', 'head_attention')


@dataclasses.dataclass
class DecodeFlags:
    """The flags of decoding (sample.py, bench.py decode)."""
    ckpt: str = flag('out/ckpt.pt', "checkpoint path, or gpt2 / ... / EleutherAI/pythia-*")
    draft: str = flag('', "a draft model's checkpoint: two-model speculative decoding")
    gamma: int = flag(4, "drafts per step of the draft model")
    temperature: float = flag(0.8, "0 = greedy (bench.py decode always runs greedy too)")
    top_k: int = flag(0, "sample among the top_k most probable tokens (0 = all)")
    top_p: float = flag(1.0, "nucleus sampling: the smallest set with this mass (1 = all)")
    seed: int = flag(1337, "the sampling generator's seed (bench.py: repeat r uses seed + r)")
    device: str = flag('auto', "auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps")
    dtype: str = flag('auto', "auto (bfloat16 on CUDA, else float32) | float32 | bfloat16")
    threads: int = flag(0, "CPU threads (0 = torch's default; 1 is fastest for tiny models)")
    draft_vocab: int = flag(0, "self-speculative: heads draft from the N most frequent tokens of "
                               "the training data only (0 = all); the output stays exact")


def cli(main, errors=(UserError,)):
    """Run main(sys.argv[1:]) as a script: the errors a user can cause end it with one line."""
    try:
        main(sys.argv[1:])
    except errors as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------
# devices

def pick_device(name='auto'):
    """'auto' -> the best device here: cuda > mps > cpu; anything else is used as given."""
    mps = getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()
    available = {'cuda': torch.cuda.is_available(), 'mps': mps, 'cpu': True}  # the best first
    if name == 'auto':
        return next(kind for kind, ok in available.items() if ok)
    if name.split(':')[0] not in available:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if not available[name.split(':')[0]]:
        raise UserError(f"device {name!r} is not available on this machine")
    return name


def autocast_for(dtype, device):
    """The context for --dtype (bfloat16: autocast, on CPU too); weights stay fp32 either way."""
    if dtype not in ('auto', 'float32', 'bfloat16'):
        raise UserError(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")
    device_type = device.split(':')[0]
    if dtype == 'bfloat16' or (dtype == 'auto' and device_type == 'cuda'):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


def device_memory(device):
    """Bytes of memory of a device: a GPU's own, else the machine's."""
    if device.startswith('cuda'):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, ValueError, OSError):  # (no sysconf, as on Windows: no check)
        return float('inf')


def set_cpu_threads(n):
    if n < 0:
        raise UserError(f"threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


class Distributed:
    """torchrun's data parallelism (a no-op without torchrun): rank, world, this rank's device."""

    def __init__(self, device_flag):
        self.ddp = int(os.environ.get('RANK', -1)) != -1
        self.rank, self.world, self.local = 0, 1, None
        self.device = pick_device(device_flag)
        if self.ddp:
            cuda = torch.cuda.is_available() and device_flag != 'cpu'
            dist.init_process_group(backend='nccl' if cuda else 'gloo')
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if cuda:  # (gloo: DDP without device_ids)
                self.local = [int(os.environ['LOCAL_RANK'])]
                self.device = f"cuda:{self.local[0]}"
                torch.cuda.set_device(self.device)
        self.master = self.rank == 0
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever stays in fp32
        torch.backends.cudnn.allow_tf32 = True

    def wrap(self, model):
        return DDP(model, device_ids=self.local) if self.ddp else model

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...]; every rank must call this."""
        objs = [obj] * self.world
        if self.ddp:
            dist.all_gather_object(objs, obj)
        return objs

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def clock(device):
    """Start a clock: returns seconds(), the wall-clock seconds since, waiting for the GPU first."""
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else lambda: None
    sync()
    t0 = time.perf_counter()
    return lambda: sync() or time.perf_counter() - t0


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove_stale_temps(path, mine=True)  # (this process's tmp)
        if not isinstance(e, (OSError, RuntimeError)):  # (torch reports a full disk as either)
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot write checkpoint {path} ({reason}; {free:.0f} MB free on its "
                        f"disk): {path} is unchanged") from e


def load_checkpoint(path):
    check_file(path, 'checkpoint')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                        f"retrain or restore it")
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        raise UserError(f"{path} is not a nanoMTP checkpoint (no model/model_args)")
    return ckpt


def upgrade_checkpoint(args, state):
    """(model_args, weights) of a checkpoint of any nanoMTP version, as today's: old defaults (block
    heads; sequential ones with attention), head_type 'linear' (now resblock), ResBlock weights
    under heads.i.resblock, WHS as softmax logits, sequential heads 2..n from index 1 (slot 0 was
    head 1, the trunk)."""
    args = {'head_type': 'block', 'head_attention': True, **args}
    args['head_type'] = {'linear': 'resblock'}.get(args['head_type'], args['head_type'])
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in state.items()}
    state = {re.sub(r'^(heads\.\d+)\.resblock\.', r'\1.', k.replace('.whs_logits', '.whs_coef')):
             torch.softmax(v, dim=0) if k.endswith('.whs_logits') else v for k, v in state.items()}
    if args['head_type'] == 'sequential' and not any(k.startswith('heads.0.') for k in state):
        state = {re.sub(r'^heads\.(\d+)\.', lambda m: f"heads.{int(m[1]) - 1}.", k)
                 .replace('heads.0.whs_coef', 'heads.whs_coef'): v for k, v in state.items()}
    return args, state


def model_from_checkpoint(ckpt):
    """Rebuild the MTPGPT a checkpoint dict describes and load its weights (any version's)."""
    args, state = upgrade_checkpoint(ckpt['model_args'], ckpt['model'])
    unknown = sorted(set(args) - {f.name for f in dataclasses.fields(MTPConfig)})
    if unknown:
        raise UserError(f"the checkpoint's model_args has unknown keys {', '.join(unknown)}: not a "
                        f"model this code builds (a hand-edited or newer checkpoint?)")
    model = MTPGPT(MTPConfig(**args))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model_args "
                        f"({str(e).splitlines()[0]})")
    bad = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:  # (it would decode token 0, or crash, and train on nan)
        raise UserError(f"the checkpoint has non-finite weights (nan/inf) in {bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: not usable")
    return model


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict) from a checkpoint path, 'gpt2*' or
    'EleutherAI/pythia-*' (Hugging Face weights, with the model's own tokenizer)."""
    if (path in GPT2_SIZES or path.startswith(PYTHIA)) and not os.path.exists(path):
        model = MTPGPT.from_gpt(from_pretrained(path))
        meta = ({'kind': 'bpe', 'encoding': 'r50k_base', 'vocab_size': 50257} if path in GPT2_SIZES
                else {'kind': 'hf', 'name': path, 'vocab_size': model.config.vocab_size})
        ckpt = {'meta': meta, 'model_args': dataclasses.asdict(model.config), 'config': {}}
    else:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
    return model.to(device).eval(), ckpt


# -----------------------------------------------------------------------------
# resuming a training run

def resumed_config(cfg, ckpt):
    """A resume continues its run: a flag not given takes the run's value, not today's default;
    one given another value is applied and said (check_resume refuses a change of model)."""
    saved = ckpt.get('config') or {}  # (device, compile, quiet: this session's, not the run's)
    names = {f.name for f in dataclasses.fields(cfg)} - {
        'init_from', 'out_dir', 'device', 'compile', 'quiet'}
    changed = [k for k in sorted(cfg.given & names & saved.keys() - {'max_iters', *MODEL})
               if saved[k] != getattr(cfg, k)]
    if changed and not cfg.quiet and int(os.environ.get('RANK', 0)) == 0:
        print("note: resuming with " + ', '.join(f"--{k}={getattr(cfg, k)} (the run had "
                                                 f"{saved[k]})" for k in changed))
    for name in (names - cfg.given) & saved.keys():
        setattr(cfg, name, saved[name])
    return cfg


def restore(ckpt, optimizer, batches, rank):
    """Continue a checkpoint: optimizer, iteration, best val loss, and this rank's RNG states
    (exact when resumed with as many ranks as were saved). Returns (iter_num, best_val)."""
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError):
        raise UserError("the checkpoint's optimizer does not match these flags: resume with the "
                        "strategy flags of the original run (freeze_trunk, trunk_lr_scale, ...)")
    saved = ckpt['rng'].get('ranks', [ckpt['rng']])
    if rank < len(saved):
        torch.set_rng_state(saved[rank]['torch'])
        batches.gen.set_state(saved[rank]['batches'])
    return ckpt['iter_num'], ckpt['best_val_loss']
