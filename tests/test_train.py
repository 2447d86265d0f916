"""Specification of train.py: it learns, resumes exactly, applies the paper's training
strategies for adapted models (training_strategy: frozen trunk, head warmup, differential LR,
WHS group, zero-weight heads), rejects bad input with one-line errors, applies presets, and
never replaces a good checkpoint with a diverged one."""
import copy
from contextlib import nullcontext
import hashlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import heads
import train as T
from common import TrainConfig, load_checkpoint, model_from_checkpoint
from conftest import (one_line_error, run_cli, run_train, tiny_mtp, train_config,
                      make_corpus, pattern_text)


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


# -----------------------------------------------------------------------------
# learning

def test_tiny_run_lowers_val_loss(corpus, tmp_path):
    """A few dozen iterations on a patterned corpus take the val loss far below chance
    (ln 32 for 32 equally likely characters), and the train loss falls."""
    s = run_train(corpus, tmp_path / 'out', '--max_iters=30', '--eval_interval=30')
    assert s['iters'] == 30 and sorted(s['losses']) == list(range(1, 31))
    assert s['losses'][1] > math.log(32) - 0.3      # starts near chance
    assert s['val_loss'] < math.log(32) - 1.5        # ends far below it
    assert s['losses'][30] < s['losses'][1] - 1.5
    assert os.path.isfile(s['ckpt'])


@pytest.mark.parametrize('schedule', ['constant', 'curriculum', 'shrink'])
def test_resume_continues_exactly(corpus, tmp_path, schedule):
    """Stopping at iter 10 and resuming (init_from=resume) gives the same losses at iters
    11..20 as an uninterrupted run (model, optimizer, LR and loss-weight schedules, batch and
    dropout RNG all restored), and the iteration count continues to 20."""
    common = ['--eval_interval=10', '--lr_decay_iters=20', '--dropout=0.1', '--warmup_iters=3',
              f'--loss_schedule={schedule}', '--schedule_frac=0.5', '--n_future=3']
    a = run_train(corpus, tmp_path / 'a', '--max_iters=20', *common)
    b1 = run_train(corpus, tmp_path / 'b', '--max_iters=10', *common)
    assert b1['iters'] == 10
    b2 = run_train(corpus, tmp_path / 'b', '--max_iters=20', '--init_from=resume', *common)
    assert b2['iters'] == 20
    assert sorted(b2['losses']) == list(range(11, 21))
    for it in range(1, 11):
        assert b1['losses'][it] == pytest.approx(a['losses'][it], abs=1e-6)
    for it in range(11, 21):
        assert b2['losses'][it] == pytest.approx(a['losses'][it], abs=1e-6), it
    assert b2['val_loss'] == pytest.approx(a['val_loss'], abs=1e-6)


def test_resume_on_another_copy_of_the_data_says_so(corpus, tmp_path, capsys):
    """Resuming on another data directory with the same tokenizer is allowed, and said."""
    shutil.copytree(corpus, tmp_path / 'copy')
    run_train(corpus, tmp_path / 'out', '--max_iters=2', '--eval_interval=2')
    s = run_train(tmp_path / 'copy', tmp_path / 'out', '--init_from=resume', '--max_iters=3',
                  '--eval_interval=3', '--quiet=false')
    assert s['iters'] == 3
    assert load_checkpoint(s['ckpt'])['config']['data_dir'] == str(tmp_path / 'copy')
    assert f"note: resuming with --data_dir={tmp_path / 'copy'} (the run had {corpus})" in \
        capsys.readouterr().out


def test_a_resume_takes_every_flag_not_given_from_its_run(corpus, tmp_path, capsys):
    """A resume continues its run: the flags not given (shape, LR, warmup, batch size, data)
    come from the run's config, not today's defaults, so the new config agrees with model_args;
    a flag given with another value is applied and said in one line."""
    run_train(corpus, tmp_path, '--max_iters=2', '--eval_interval=2', '--learning_rate=1e-5',
              '--min_lr=1e-6', '--warmup_iters=0', '--batch_size=4')
    ckpt = load_checkpoint(T.train(T.parse_config(
        ['--init_from=resume', f'--out_dir={tmp_path}', '--max_iters=3']))['ckpt'])
    for name in ('n_layer', 'n_head', 'n_embd', 'n_future', 'head_type', 'attach_layer'):
        assert ckpt['config'][name] == ckpt['model_args'][name], name
    assert ckpt['iter_num'] == 3 and ckpt['model_args']['n_layer'] == 2
    assert [ckpt['config'][k] for k in ('learning_rate', 'warmup_iters', 'batch_size',
                                        'data_dir')] == [1e-5, 0, 4, str(corpus)]
    capsys.readouterr()
    ckpt = load_checkpoint(T.train(T.parse_config(
        ['--init_from=resume', f'--out_dir={tmp_path}', '--max_iters=4', '--quiet=false',
         '--learning_rate=2e-5', '--n_layer=2']))['ckpt'])  # (n_layer: given, the same)
    assert "note: resuming with --learning_rate=2e-05 (the run had 1e-05)" in \
        capsys.readouterr().out
    assert ckpt['config']['learning_rate'] == 2e-5 and ckpt['config']['batch_size'] == 4


def test_an_mtp_checkpoint_adapted_without_head_type_keeps_its_heads(corpus, tmp_path):
    """No --head_type: a ResBlock checkpoint is fine-tuned whole with its own heads (not re-adapted
    to the default sequential heads, which its head 1 cannot be), and the new checkpoint's config
    records the model it trained, not the flags' defaults."""
    run_train(corpus, tmp_path / 'rb', '--head_type=resblock', '--n_future=3', '--max_iters=2',
              '--eval_interval=2')
    ckpt = load_checkpoint(T.train(T.parse_config(
        [f"--init_from={tmp_path / 'rb' / 'ckpt.pt'}", f'--data_dir={corpus}', '--max_iters=2',
         f"--out_dir={tmp_path / 'ft'}", '--block_size=16', '--batch_size=4', '--quiet=true',
         '--device=cpu', '--eval_iters=1']))['ckpt'])
    assert ckpt['model_args']['head_type'] == ckpt['config']['head_type'] == 'resblock'
    for name in ('n_future', 'n_layer', 'n_embd', 'attach_layer'):
        assert ckpt['config'][name] == ckpt['model_args'][name], name


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def test_memory_efficient_training_matches_standard(corpus, tmp_path, arch, request):
    """--memory_efficient=true (heads' forward+backward one at a time) trains the same as the
    standard step: the same loss curve, with WHS and explicit loss weights (GPT-NeoX: adapting
    neox_ntp_ckpt, as train.py builds GPT-2-style models from scratch)."""
    flags = ['--max_iters=6', '--eval_interval=6', '--n_future=3', '--whs=true',
             '--loss_weights=1,0.5,0.25']
    if arch == 'neox':
        flags.append(f"--init_from={request.getfixturevalue('neox_ntp_ckpt')}")
    a = run_train(corpus, tmp_path / 'a', *flags)
    b = run_train(corpus, tmp_path / 'b', *flags, '--memory_efficient=true')
    for it in range(1, 7):
        assert b['losses'][it] == pytest.approx(a['losses'][it], abs=1e-4), it


def test_lr_schedule():
    """get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=14,
                        max_iters=100)
    lrs = [T.get_lr(it, cfg) for it in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55)
    assert all(x >= y for x, y in zip(lrs[4:15], lrs[5:15]))
    assert lrs[14:] == pytest.approx([0.1] * 6)


def groups_by_name(optimizer):
    named = {}
    for g in optimizer.param_groups:
        named.setdefault(g['name'], []).append(g)
    return named


def held(optimizer, name=None):
    """ids of the parameters the optimizer holds (in the groups called `name`, or all)."""
    return [id(p) for g in optimizer.param_groups if name in (None, g['name'])
            for p in g['params']]


def test_training_strategy_puts_trunk_and_heads_in_named_groups(arch):
    """training_strategy(model, cfg, device_type) returns Strategy(loss_weights, optimizer,
    trunk_trainable). The optimizer's param groups are named: trunk (lr_scale =
    trunk_lr_scale) and heads (1.0), the WHS coefficients among the heads' parameters, without
    weight decay and with Adam's default eps; group lr = learning_rate * lr_scale, and every
    parameter is in exactly one group."""
    model = tiny_mtp(n_future=3, whs=True, arch=arch)
    cfg = TrainConfig(trunk_lr_scale=0.25, learning_rate=1e-3)
    strategy = T.training_strategy(model, cfg, 'cpu')
    groups = groups_by_name(strategy.optimizer)
    assert sorted(groups) == ['heads', 'trunk']
    for name, scale in (('trunk', 0.25), ('heads', 1.0)):
        for g in groups[name]:
            assert g['lr_scale'] == scale and g['lr'] == pytest.approx(1e-3 * scale), name
            assert g['eps'] == 1e-8, name
    whs = [head.whs_coef for head in model.heads]
    no_decay = [id(p) for g in groups['heads'] if g['weight_decay'] == 0 for p in g['params']]
    assert all(id(c) in no_decay for c in whs)
    assert sorted(held(strategy.optimizer, 'trunk')) == sorted(map(id, model.trunk_parameters()))
    assert sorted(held(strategy.optimizer, 'heads')) == sorted(map(id, model.heads.parameters()))
    everything = held(strategy.optimizer)
    assert len(everything) == len(set(everything)) == len(list(model.parameters()))
    assert strategy.loss_weights == [1.0, 1.0, 1.0]
    assert all(strategy.trunk_trainable(it) for it in (0, 1, 10 ** 6))


def test_loss_schedules_move_the_horizon_one_head_at_a_time():
    """scheduled_weights: lambda_k x clamp(h - k + 1, 0, 1), the horizon h between 1 and n."""
    weights = [1.0, 0.5, 0.25, 0.125]  # (--mtp_weight=0.5 --mtp_decay=0.5)

    def at(schedule, *its):
        cfg = TrainConfig(loss_schedule=schedule, schedule_frac=0.25, max_iters=1000)
        return [T.scheduled_weights(weights, it, cfg) for it in its]
    assert at('constant', 0, 500, 999) == [weights] * 3
    # curriculum: NTP for the first quarter, the heads ramped in over the second (h = 2.5 at 3/8)
    assert at('curriculum', 0, 250, 375, 500, 999) == [
        [1, 0, 0, 0], [1, 0, 0, 0], [1, 0.5, 0.125, 0], weights, weights]
    # shrink: every head until the last quarter, then the farthest one out first
    assert at('shrink', 0, 750, 875, 1000) == [weights, weights, [1, 0.5, 0.125, 0], [1, 0, 0, 0]]


def test_a_schedule_past_its_span_stays_at_its_end_and_needs_lambda_1(corpus, tmp_path):
    """Past lr_decay_iters the horizon stays where the schedule ends (head 1 keeps its weight);
    a schedule with lambda_1 = 0 would leave no weight at all: refused in one line."""
    cfg = TrainConfig(loss_schedule='shrink', schedule_frac=0.5, max_iters=10, lr_decay_iters=5)
    assert T.scheduled_weights([1.0, 0.5], 9, cfg) == [1.0, 0.0]
    one_line_error(lambda: run_train(corpus, tmp_path, '--loss_schedule=curriculum',
                                     '--loss_weights=0,1', '--max_iters=2'),
                   match='lambda_1 = 0 leaves no weight')


def test_the_constant_schedule_steps_exactly_as_the_full_mtp_loss(corpus):
    """train_step with constant weights (a trailing 0 included) computes every head, as
    model(x, y) does: the same loss and the same dropout draws."""
    cfg = train_config(corpus, '/unused', '--n_future=3', '--dropout=0.1')
    model = heads.MTPGPT(heads.MTPConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=32,
                                         block_size=16, n_future=3, head_type='block',
                                         dropout=0.1))
    x, y = torch.randint(0, 32, (2, 2, 16))

    class Once:
        def next(self):
            return x, y
    torch.manual_seed(5)
    loss = T.train_step(model, model, Once(), [1.0, 0.5, 0.0], cfg, nullcontext(), 1, 'test')
    after_step = torch.get_rng_state()
    torch.manual_seed(5)
    assert loss == model(x, y, loss_weights=[1.0, 0.5, 0.0])[1].item()
    assert torch.equal(after_step, torch.get_rng_state())  # head 3's dropout drawn too


def test_the_curriculums_ntp_phase_is_plain_next_token_training(corpus, tmp_path):
    """Heads with weight 0 are not computed: until the ramp, a curriculum run trains exactly as a
    run whose extra heads are frozen (--loss_weights=1,0), and leaves the heads untouched."""
    a = run_train(corpus, tmp_path / 'a', '--max_iters=3', '--loss_schedule=curriculum',
                  '--schedule_frac=1')
    b = run_train(corpus, tmp_path / 'b', '--max_iters=3', '--loss_weights=1,0')
    a, b = (load_checkpoint(s['ckpt'])['model'] for s in (a, b))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_training_strategy_leaves_a_frozen_trunk_out_of_the_optimizer():
    """freeze_trunk: the optimizer holds the heads only (one group, heads), the trunk has
    requires_grad off and is never trainable."""
    model = tiny_mtp(n_future=3)
    strategy = T.training_strategy(model, TrainConfig(freeze_trunk=True), 'cpu')
    assert sorted(groups_by_name(strategy.optimizer)) == ['heads']
    assert sorted(held(strategy.optimizer)) == sorted(map(id, model.heads.parameters()))
    assert not any(p.requires_grad for p in model.trunk_parameters())
    assert not any(strategy.trunk_trainable(it) for it in (0, 10, 10 ** 6))


def test_training_strategy_freezes_a_head_with_zero_loss_weight():
    """--loss_weights=0,1,0.5: head 1 (lambda_1 = 0) is frozen, absent from the optimizer;
    heads 2 and 3 and the trunk are in it. loss_weights come back as numbers; without them,
    lambda_k = mtp_weight * mtp_decay^(k-2)."""
    model = tiny_mtp(n_future=3)
    strategy = T.training_strategy(model, TrainConfig(loss_weights='0,1,0.5'), 'cpu')
    assert strategy.loss_weights == [0.0, 1.0, 0.5]
    ids = set(held(strategy.optimizer))
    assert not any(id(p) in ids or p.requires_grad for p in model.heads[0].parameters())
    for p in [*model.heads[1].parameters(), *model.heads[2].parameters(),
              *model.trunk_parameters()]:
        assert id(p) in ids and p.requires_grad
    decayed = T.training_strategy(tiny_mtp(n_future=3),
                                  TrainConfig(mtp_weight=0.5, mtp_decay=0.5), 'cpu')
    assert decayed.loss_weights == [1.0, 0.5, 0.25]


def test_training_strategy_head_warmup_holds_the_trunk_back_for_its_iterations():
    """head_warmup_iters=5: the trunk is in the optimizer (its own group, trunk_lr_scale) but
    trunk_trainable(it) is False for it < 5 and True from then on."""
    model = tiny_mtp(n_future=2)
    cfg = TrainConfig(head_warmup_iters=5, trunk_lr_scale=0.5)
    strategy = T.training_strategy(model, cfg, 'cpu')
    assert sorted(held(strategy.optimizer, 'trunk')) == sorted(map(id, model.trunk_parameters()))
    assert [strategy.trunk_trainable(it) for it in (0, 4, 5, 100)] == [False, False, True, True]


# the same strategies in real training runs

class SaveRecorder:
    """Wraps train.save_checkpoint: keeps a copy of the weights and optimizer param groups of
    every checkpoint the run writes, keyed by iteration."""

    def __init__(self, monkeypatch):
        self.real = T.save_checkpoint
        self.saves = {}
        monkeypatch.setattr(T, 'save_checkpoint', self)

    def __call__(self, obj, path):
        self.saves[obj['iter_num']] = dict(
            model={k: v.detach().clone() for k, v in obj['model'].items()},
            groups=copy.deepcopy(obj['optimizer']['param_groups']),
            config=obj['config'])
        self.real(obj, path)


def trunk_keys(state):
    return [k for k in state if not k.startswith('heads.')]


def test_freeze_trunk_trains_only_the_heads(corpus, source_ckpt, tmp_path):
    """--freeze_trunk=true from an NTP checkpoint: the trunk (embeddings, trunk blocks, final
    norm, unembedding) is bit-identical after training, the heads changed, and the optimizer
    holds neither groups nor state for trunk parameters."""
    src = load_checkpoint(source_ckpt)['model']
    out = tmp_path / 'out'
    run_train(corpus, out, f'--init_from={source_ckpt}', '--freeze_trunk=true', '--max_iters=5',
              '--eval_interval=5')
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    state = ckpt['model']
    keys = trunk_keys(state)
    assert 'transformer.wte.weight' in keys and 'transformer.h.0.attn.c_attn.weight' in keys
    for k in keys:
        assert torch.equal(state[k], src[k]), k
    assert not torch.equal(state['heads.0.blocks.0.mlp.c_fc.weight'],
                           src['heads.0.blocks.0.mlp.c_fc.weight'])
    model = model_from_checkpoint(ckpt)
    n_head_params = len(list(model.heads.parameters()))
    groups = ckpt['optimizer']['param_groups']
    assert {g['name'] for g in groups} == {'heads'}
    assert sum(len(g['params']) for g in groups) == n_head_params
    assert len(ckpt['optimizer']['state']) == n_head_params


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def test_head_warmup_keeps_the_trunk_fixed_then_trains_it(corpus, source_ckpt, tmp_path,
                                                          monkeypatch):
    """--head_warmup_iters=4: after 4 iterations the trunk is bit-identical to the source (the
    heads have moved); by iteration 8 the trunk has been trained too."""
    rec = SaveRecorder(monkeypatch)
    src = load_checkpoint(source_ckpt)['model']
    run_train(corpus, tmp_path / 'out', f'--init_from={source_ckpt}', '--head_warmup_iters=4',
              '--max_iters=8', '--eval_interval=4', '--eval_iters=1')
    assert sorted(rec.saves) == [4, 8]
    at4, at8 = rec.saves[4]['model'], rec.saves[8]['model']
    for k in trunk_keys(at4):
        assert torch.equal(at4[k], src[k]), k
    head_w = 'heads.0.blocks.0.attn.c_attn.weight'
    assert not torch.equal(at4[head_w], src[head_w])
    changed = [k for k in trunk_keys(at8) if not torch.equal(at8[k], src[k])]
    assert 'transformer.wte.weight' in changed and 'transformer.h.0.mlp.c_fc.weight' in changed


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
@pytest.mark.parametrize('flags,trunk_moves', [
    ([], True), (['--freeze_trunk=true'], False), (['--head_warmup_iters=2'], True),
    (['--trunk_lr_scale=0.1', '--whs=true'], True),
    (['--freeze_trunk=true', '--loss_weights=0,1,1', '--memory_efficient=true'], False)],
    ids=['joint', 'frozen-trunk', 'head-warmup', 'differential-lr-whs', 'distill-like'])
def test_every_strategy_adapts_a_model_to_sequential_heads(corpus, source_ckpt, tmp_path,
                                                           flags, trunk_moves):
    """--head_type=sequential under each of the paper's strategies: the heads 2..n (new modules)
    train; the trunk, which is also head 1, moves only when the strategy trains it."""
    source = model_from_checkpoint(load_checkpoint(source_ckpt)).eval()
    s = run_train(corpus, tmp_path / 'out', f'--init_from={source_ckpt}', '--head_type=sequential',
                  '--n_future=3', '--max_iters=4', '--eval_interval=4', *flags)
    assert len(s['val_heads']) == 3 and all(math.isfinite(h['loss']) for h in s['val_heads'])
    ckpt = load_checkpoint(s['ckpt'])
    state = ckpt['model']
    assert ckpt['model_args']['head_type'] == 'sequential'
    assert any(k.startswith('heads.1.block.') for k in state)  # head 3 (heads 2..n from 0)
    adapted = model_from_checkpoint(ckpt).eval()
    x = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        head_1_kept = torch.equal(adapted(x, n_heads=1)[0], source(x, n_heads=1)[0])
    assert head_1_kept != trunk_moves


@pytest.mark.parametrize('arch', ['gpt2', pytest.param('neox', marks=pytest.mark.slow)])
def test_differential_lr_scales_the_trunk_groups(corpus, source_ckpt, tmp_path, monkeypatch):
    """--trunk_lr_scale=0.25, adapting an NTP checkpoint: at every step the trunk's param groups
    have lr = 0.25 * get_lr(it) and the heads' groups lr = get_lr(it)."""
    rec = SaveRecorder(monkeypatch)
    run_train(corpus, tmp_path / 'out', f'--init_from={source_ckpt}', '--trunk_lr_scale=0.25',
              '--max_iters=5', '--eval_interval=1', '--eval_iters=1', '--warmup_iters=2', '--lr_decay_iters=5')
    assert sorted(rec.saves) == [1, 2, 3, 4, 5]
    lrs = set()
    for it, saved in rec.saves.items():
        cfg = TrainConfig(**saved['config'])
        lr = T.get_lr(it - 1, cfg)  # the LR of the step that produced iteration `it`
        lrs.add(lr)
        names = {g['name'] for g in saved['groups']}
        assert names == {'trunk', 'heads'}
        for g in saved['groups']:
            expected = lr * (0.25 if g['name'] == 'trunk' else 1.0)
            assert g['lr'] == pytest.approx(expected, rel=1e-12), (it, g['name'])
    assert len(lrs) == 5  # the schedule really moved



def test_whs_mix_learns_in_a_short_adaptation_and_is_reported(corpus, source_ckpt, tmp_path):
    """WHS starts exactly on the last trunk layer (one-hot) and, in 20 steps adapting a trained
    model at the heads' own LR, every head puts a total weight of at least 0.02 on the layers
    below it. The mix (MTPGPT.whs_weights) is in the summary and in the checkpoint's eval.
    (The softmax it replaced, started saturated at logit 12, kept that weight below 1e-6 in this
    same run, even with its LR x100: its gradients were ~e^-12 of normal.)"""
    summary = run_train(corpus, tmp_path, f'--init_from={source_ckpt}', '--whs=true',
                        '--max_iters=20', '--eval_interval=10')
    mix = summary['model'].whs_weights()
    assert mix.shape == (2, 2)  # 2 heads, h_0 .. h_attach with attach_layer = 1
    assert (mix[:, :-1].abs().sum(dim=1) >= 0.02).all(), mix
    ckpt = torch.load(os.path.join(tmp_path, 'ckpt.pt'), weights_only=False)
    assert torch.allclose(torch.tensor(ckpt['eval']['whs']), mix)
    assert torch.allclose(torch.tensor(summary['whs']), mix)


# -----------------------------------------------------------------------------
# bad input: one-line errors, before anything is written

def preset(content):
    """A table entry: a preset file with this content (written by the test)."""
    return f'PRESET:{content}'


# (flags after the tiny defaults, fragments the one-line message must contain).
# {ntp}: a trained next-token checkpoint; {tmp}: the test's directory; {truncated} / {garbage}:
# an out_dir whose ckpt.pt is a truncated checkpoint / garbage; {ntpdir}: a copy of {ntp}'s
# directory; {norng} / {badargs}: one with the copy lacking rng / with a model_args key too many;
# {other}: a corpus with another alphabet of the same size; {emptybins}: a data dir with empty
# .bin files; {blocker}: a plain file (no directory can be made under it).
TRAIN_ERRORS = [
    # flags and preset files
    (['--max_iter=5'], ("'max_iter'", 'max_iters', 'learning_rate')),  # lists the valid flags
    (['--max_iters=abc'], ('max_iters', 'int')),
    (['--learning_rate=fast'], ('learning_rate', 'float')),
    (['--whs=maybe'], ('whs', 'bool')),
    (['--max_iters'], ('max_iters',)),                              # no value
    ([preset("max_iterz = 7\n")], "'max_iterz'"),
    ([preset("max_iters = 'seven'\n")], 'max_iters'),
    ([preset("import os\n")], 'not `name = value`'),
    ([preset("max_iters = 7 +\n")], 'cannot read preset'),
    (['{tmp}/nope.py'], 'not found'),                               # a missing preset file
    # data and checkpoints
    (['--data_dir={tmp}/nothing'], 'prepare.py'),                   # says how to prepare it
    (['--init_from=resume', '--out_dir={truncated}'], 'corrupt'),
    (['--init_from=resume', '--out_dir={garbage}'], 'corrupt'),
    (['--init_from=resume'], 'not found'),
    (['--init_from={ntp}', '--block_size=32'], "--block_size=32 > the model's 16"),
    (['--init_from={ntp}', '--n_layer=3'], ('--n_layer=3', 'n_layer=2', 'drop the flag')),
    (['--init_from={ntp}', '--n_future=1000000'], 'leaves head 1000000 no target'),
    (['--out_dir={blocker}'], ('cannot write to out_dir', 'blocker')),   # a file, not a folder
    # options that cannot go together
    (['--init_from={ntp}', '--freeze_trunk=true', '--trunk_lr_scale=0.5'], 'freeze_trunk'),
    (['--whs=true', '--n_future=1'], 'whs'),
    (['--freeze_trunk=true'], 'freeze_trunk'),                      # with init_from=scratch
    (['--head_warmup_iters=5'], 'head_warmup_iters'),               # with init_from=scratch
    (['--attach_layer=3'], 'attach_layer'),                         # n_layer is 2
    (['--head_type=resblock', '--attach_layer=1'], 'attach_layer'),
    (['--head_type=mlp'], 'head_type'),
    (['--n_future=0'], 'n_future'),
    (['--loss_weights=1,half'], 'loss_weights'),
    (['--compile=true', '--memory_efficient=true'], 'memory_efficient'),
    (['--log_interval=0'], 'log_interval'),
    (['--block_size=2'], 'block_size'),                             # 2 heads need > 2 positions
    (['--n_future=1000000'], 'leaves head 1000000 no target'),      # said before it is built
    # sizes past the machine's memory: refused before building, with the estimate
    (['--n_layer=100000000'], ('needs about', 'GiB', 'parameters', 'more than the')),
    (['--n_embd=10000000'], ('needs about', 'GiB', 'more than the')),
    (['--batch_size=10000000000'], ('needs about', 'tokens a micro-batch', 'more than the')),
    (['--init_from={ntp}', '--batch_size=100000000'], ('needs about', 'more than the')),
    (['--device=tpu'], 'unknown device'),
    (['--loss_weights=1,0.5,0.25'], 'loss_weights'),                # 3 weights for 2 heads
    # numbers that failed deep inside, or silently
    (['--learning_rate=nan'], 'learning_rate must be a number > 0, got nan'),
    (['--learning_rate=0'], 'learning_rate must be a number > 0'),
    (['--beta1=1'], 'beta1 must be a number in [0, 1)'),
    (['--beta2=-0.5'], 'beta2 must be a number in [0, 1)'),
    (['--dropout=1'], 'dropout must be a number in [0, 1)'),
    (['--n_embd=31'], 'n_embd (31) must be divisible by n_head (2)'),
    (['--n_embd=0'], 'n_embd must be >= 1'),
    (['--loss_weights=1,nan'], 'loss_weights must be finite'),
    (['--warmup_iters=-100'], '--warmup_iters must be >= 0, got -100'),
    (['--loss_schedule=warp'], 'loss_schedule must be constant, curriculum or shrink'),
    (['--schedule_frac=0'], '--schedule_frac must be in (0, 1]'),
    (['--min_lr=1', '--learning_rate=0.1'], 'min_lr 1.0 is above learning_rate 0.1'),
    (['--head_attention=true'], ('head_attention', 'block heads', 'drop --head_attention')),
    (['--data_dir={emptybins}'], ('train.bin', 'is empty')),
    (['--out_dir={blocker}/out'], ('cannot write to out_dir', 'blocker')),
    # the source checkpoint is never overwritten
    (['--init_from={ntpdir}/ckpt.pt', '--out_dir={ntpdir}', '--n_future=1'],
     'holds the source checkpoint'),
    # a resume continues the checkpoint's run (its copy in {ntpdir}: 10 iterations, n_future=1)
    (['--init_from=resume', '--out_dir={ntpdir}', '--max_iters=20'],
     "--n_future=2 differs from the checkpoint's n_future=1"),
    (['--init_from=resume', '--out_dir={ntpdir}', '--n_future=1', '--n_layer=3',
      '--max_iters=20'], "--n_layer=3 differs from the checkpoint's n_layer=2"),
    (['--init_from=resume', '--out_dir={ntpdir}', '--n_future=4', '--max_iters=20'],
     "--n_future=4 differs from the checkpoint's n_future=1"),     # (given, though the default)
    (['--init_from=resume', '--out_dir={ntpdir}', '--n_future=1'],
     ('nothing to do', 'iteration 10', 'max_iters is 1')),
    (['--init_from=resume', '--out_dir={ntpdir}', '--n_future=1', '--data_dir={other}',
      '--max_iters=20'], ("tokenizer differs", 'other', 'chars')),   # same size, other letters
    (['--init_from={ntp}', '--data_dir={other}'], "tokenizer differs"),
    (['--init_from=resume', '--out_dir={norng}', '--n_future=1', '--max_iters=20'],
     ('has no rng', 'cannot be resumed')),
    (['--init_from=resume', '--out_dir={badargs}', '--n_future=1', '--max_iters=20'],
     ('unknown keys', 'n_lyr')),
]


def test_loss_weights_that_are_not_numbers_are_refused_before_any_data_is_read(tmp_path):
    cfg = T.parse_config(['--loss_weights=1,half', f'--data_dir={tmp_path / "nothing"}'])
    one_line_error(T.check_config, cfg, match="loss_weights must be comma-separated numbers")


def test_a_resume_names_the_shape_flag_its_sequential_heads_cannot_take(corpus, tmp_path):
    run_train(corpus, tmp_path, '--head_type=sequential', '--max_iters=2')
    one_line_error(lambda: run_train(corpus, tmp_path, '--init_from=resume', '--n_layer=3',
                                     '--head_type=sequential', '--max_iters=4'),
                   match="--n_layer=3 differs from the checkpoint's n_layer=2")


def damaged_copy(ntp_ckpt, out, damage=None):
    """A copy of the checkpoint in directory `out` (byte for byte, or changed by damage)."""
    out.mkdir()
    if damage is None:
        shutil.copy(ntp_ckpt, out / 'ckpt.pt')
    else:
        ckpt = torch.load(ntp_ckpt, weights_only=False)
        damage(ckpt)
        torch.save(ckpt, out / 'ckpt.pt')
    return str(out)


def empty_bins(corpus, out):
    out.mkdir()
    shutil.copy(os.path.join(corpus, 'meta.json'), out)
    for split in ('train', 'val'):
        (out / f'{split}.bin').write_bytes(b'')
    return str(out)


def placeholders(tmp_path, ntp_ckpt, corpus, flags):
    """The paths the table's placeholders stand for; each made only when a flag uses it."""
    makers = dict(
        ntpdir=lambda out: damaged_copy(ntp_ckpt, out),
        norng=lambda out: damaged_copy(ntp_ckpt, out, lambda c: c.pop('rng')),
        badargs=lambda out: damaged_copy(ntp_ckpt, out, lambda c: c['model_args'].update(n_lyr=2)),
        other=lambda out: make_corpus(out, pattern_text().swapcase()),
        emptybins=lambda out: empty_bins(corpus, out),
        blocker=lambda out: out.write_text('a plain file') and str(out))
    return {name: make(tmp_path / name) for name, make in makers.items()
            if any('{' + name + '}' in flag for flag in flags)}


def resolve(flags, tmp_path, ntp_ckpt, corpus=None):
    """The table's flags with their placeholders filled in (files written as needed)."""
    resolved, paths = [], placeholders(tmp_path, ntp_ckpt, corpus, flags)
    for flag in flags:
        if flag.startswith('PRESET:'):
            path = tmp_path / 'p.py'
            path.write_text(flag[len('PRESET:'):])
            flag = str(path)
        for damage in ('truncated', 'garbage'):
            if '{' + damage + '}' in flag:
                out = tmp_path / damage
                out.mkdir()
                data = open(ntp_ckpt, 'rb').read()
                (out / 'ckpt.pt').write_bytes(data[:len(data) // 3] if damage == 'truncated'
                                              else b'\x80garbage' * 100)
                flag = flag.replace('{' + damage + '}', str(out))
        resolved.append(flag.format(tmp=tmp_path, ntp=ntp_ckpt, **paths))
    return resolved


@pytest.mark.parametrize('flags,fragments', TRAIN_ERRORS,
                         ids=[' '.join(f) for f, _ in TRAIN_ERRORS])
def test_bad_input_is_a_one_line_user_error_and_writes_nothing(corpus, ntp_ckpt, tmp_path,
                                                               flags, fragments):
    """Unknown flags, wrong types, bad presets, missing data or checkpoints and options that
    cannot go together stop the run with one line that names the problem; no checkpoint is
    written."""
    flags = resolve(flags, tmp_path, ntp_ckpt, corpus)
    one_line_error(lambda: T.train(train_config(corpus, tmp_path / 'out', '--max_iters=1',
                                                *flags)), match=fragments)
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')
    if os.path.exists(tmp_path / 'ntpdir'):  # the checkpoint there is left as it was
        assert sha(tmp_path / 'ntpdir' / 'ckpt.pt') == sha(ntp_ckpt)


# (train.py's arguments, fragments of the line it prints): the real command line, once for a
# bad flag and once for an error found while starting the run (the table above checks the rest)
CLI_ERRORS = [
    (['--quiet=true', '--n_futur=2'], ('n_futur', 'n_future', 'max_iters')),
    (['--quiet=true', '--device=cpu', '--data_dir={tmp}/none', '--out_dir={tmp}/out'],
     'prepare.py'),
]


@pytest.mark.parametrize('args,fragments', CLI_ERRORS, ids=[' '.join(a) for a, _ in CLI_ERRORS])
def test_cli_prints_a_user_error_as_one_line_and_exits_nonzero(tmp_path, args, fragments):
    one_line_error(run_cli('train.py', *[a.format(tmp=tmp_path) for a in args]),
                   match=fragments)


# -----------------------------------------------------------------------------
# flags and presets

def test_flag_values_are_converted():
    cfg = T.parse_config(['--max_iters=7', '--learning_rate=3e-4', '--whs=true', '--bias=0',
                          '--out_dir=x'])
    assert (cfg.max_iters, cfg.learning_rate, cfg.whs, cfg.bias, cfg.out_dir) == \
        (7, 3e-4, True, False, 'x')


def test_preset_file_is_applied(corpus, tmp_path):
    """`name = value` lines of a preset file set the config, and the run honours them."""
    preset = tmp_path / 'p.py'
    preset.write_text("# a preset\nmax_iters = 7\neval_interval = 7\nlearning_rate = 1e-3\n"
                      "whs = False\n")
    cfg = T.parse_config([str(preset)])
    assert (cfg.max_iters, cfg.eval_interval, cfg.learning_rate) == (7, 7, 1e-3)
    cfg = train_config(corpus, tmp_path / 'out')
    cfg = T.parse_config([str(preset)], base=cfg)
    s = T.train(cfg)
    assert s['iters'] == 7 and len(s['losses']) == 7


def test_command_line_flags_override_the_preset(tmp_path):
    """defaults < preset file < --name=value, wherever the flag is written on the line."""
    preset = tmp_path / 'p.py'
    preset.write_text("max_iters = 7\n")
    assert T.parse_config([str(preset), '--max_iters=3']).max_iters == 3
    assert T.parse_config(['--max_iters=3', str(preset)]).max_iters == 3


# -----------------------------------------------------------------------------
# divergence

def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    """A non-finite loss stops training with a UserError naming the loss and the iteration;
    the checkpoint written before is left byte-for-byte intact."""
    out = tmp_path / 'out'
    run_train(corpus, out, '--max_iters=4', '--eval_interval=2')
    before = sha(out / 'ckpt.pt')

    real_loss, calls = heads.mtp_loss, []

    def nan_after_two(*args, **kw):
        calls.append(1)
        loss = real_loss(*args, **kw)
        return loss * float('nan') if len(calls) > 2 else loss

    monkeypatch.setattr(heads, 'mtp_loss', nan_after_two)
    # resumed at iter 4: iters 4 and 5 are fine, iter 6 is NaN, the next eval would be at 8
    cfg = train_config(corpus, out, '--init_from=resume', '--max_iters=12', '--eval_interval=4')
    msg = one_line_error(T.train, cfg, match='loss is nan')
    assert 'iter 6' in msg
    assert sha(out / 'ckpt.pt') == before
    assert [f for f in os.listdir(out) if f != 'ckpt.pt'] == []


def test_divergence_before_any_checkpoint_says_none_was_written(corpus, tmp_path, monkeypatch):
    """The divergence message claims an intact checkpoint only when there is one."""
    real_loss = heads.mtp_loss
    monkeypatch.setattr(heads, 'mtp_loss', lambda *a, **kw: real_loss(*a, **kw) * float('nan'))
    message = one_line_error(T.train, train_config(corpus, tmp_path / 'out', '--max_iters=4'),
                             match=('loss is nan at iter 0', 'no checkpoint was written'))
    assert 'intact' not in message


def test_divergence_right_before_an_eval_keeps_the_good_checkpoint(corpus, tmp_path):
    """A step that blows the weights up (learning_rate=1e30) immediately followed by an
    evaluation must not overwrite the last good checkpoint with the diverged model: the run
    stops with a UserError about the loss and the earlier checkpoint is byte-for-byte intact."""
    out = tmp_path / 'out'
    run_train(corpus, out, '--max_iters=4', '--eval_interval=4')
    before = sha(out / 'ckpt.pt')
    cfg = train_config(corpus, out, '--init_from=resume', '--max_iters=10', '--eval_interval=1',
                       '--learning_rate=1e30', '--warmup_iters=0')
    one_line_error(T.train, cfg, match='loss')
    assert sha(out / 'ckpt.pt') == before
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


# -----------------------------------------------------------------------------
# nobody's work is lost: an out_dir has one writer, and a run never destroys another's checkpoint

def test_a_second_writer_of_an_out_dir_is_refused_and_a_dead_ones_mark_taken_over(corpus,
                                                                                  tmp_path):
    """train.py owns its out_dir while it runs (writer.<pid>): a second run into it is a
    one-line error naming the first's process; the mark of a process that died is taken over."""
    out = tmp_path / 'out'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (out / f'writer.{holder.pid}').touch()
        argv = [f'--data_dir={corpus}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
                '--quiet=true', '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32',
                '--block_size=16', '--n_future=2', '--head_type=block', '--eval_iters=1']
        one_line_error(T.main, argv, match=(str(out), f'process {holder.pid}'))
        assert not (out / 'ckpt.pt').exists()
    finally:
        holder.kill()
        holder.wait()
    T.main(argv)  # the holder is dead: its mark is taken over, and the run ends with no mark
    assert (out / 'ckpt.pt').exists() and not list(out.glob('writer.*'))


def test_a_run_that_does_not_resume_moves_another_runs_checkpoint_aside(corpus, tmp_path,
                                                                         capsys):
    run_train(corpus, tmp_path, '--max_iters=2', '--eval_interval=2', '--seed=1')
    first = (tmp_path / 'ckpt.pt').read_bytes()
    capsys.readouterr()
    run_train(corpus, tmp_path, '--max_iters=2', '--eval_interval=2', '--seed=2')
    [aside] = tmp_path.glob('ckpt.replaced-*.pt')
    assert aside.read_bytes() == first and (tmp_path / 'ckpt.pt').read_bytes() != first
    assert f"was not resumed: it is moved to {aside}" in capsys.readouterr().out


def test_a_run_stopped_before_its_first_save_moves_nothing(corpus, tmp_path, monkeypatch):
    """The checkpoint is moved aside only at the new run's first save: a typo in init_from, or
    a Ctrl-C before the first evaluation, leaves it where it was, so --init_from=resume still
    finds it. On the command line, an out_dir that is a file is one line."""
    run_train(corpus, tmp_path, '--max_iters=2', '--eval_interval=2')
    before = (tmp_path / 'ckpt.pt').read_bytes()
    one_line_error(lambda: T.train(train_config(corpus, tmp_path, '--init_from=resum')),
                   match='checkpoint not found')

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, 'train_step', ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        T.train(train_config(corpus, tmp_path, '--max_iters=2', '--eval_interval=2', '--seed=3'))
    assert (tmp_path / 'ckpt.pt').read_bytes() == before and not list(tmp_path.glob('*.replaced*'))
    (tmp_path / 'afile').write_text('x')
    one_line_error(T.main, [f"--out_dir={tmp_path / 'afile'}", '--quiet=true'],
                   match=('cannot write to out_dir', 'afile'))


def test_an_mtp_checkpoint_kept_whole_refuses_head_flags_it_would_drop(corpus, tmp_path):
    """Without --head_type an MTP source keeps its heads: a --n_future that disagrees is refused
    in one line, not silently dropped."""
    run_train(corpus, tmp_path / 'rb', '--head_type=resblock', '--n_future=3', '--max_iters=2',
              '--eval_interval=2')
    one_line_error(lambda: T.train(T.parse_config(
        [f"--init_from={tmp_path / 'rb' / 'ckpt.pt'}", f'--data_dir={corpus}', '--n_future=2',
         f"--out_dir={tmp_path / 'ft'}", '--block_size=16', '--quiet=true', '--device=cpu'])),
        match=('--n_future=2', 'n_future=3', '--head_type'))
