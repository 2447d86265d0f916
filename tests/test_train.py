"""Specification of train.py: it learns, resumes exactly, rejects bad input with one-line
errors, applies presets, and never replaces a good checkpoint with a diverged one."""
import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

import heads
import model as M
import train as T
from conftest import REPO, run_train, train_config


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_line_user_error(fn, *args, match=None):
    with pytest.raises(M.UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and '\n' not in msg
    if match:
        assert match in msg, msg
    return msg


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


def test_resume_continues_exactly(corpus, tmp_path):
    """Stopping at iter 10 and resuming (init_from=resume) gives the same losses at iters
    11..20 as an uninterrupted run (model, optimizer, LR schedule, batch and dropout RNG all
    restored), and the iteration count continues to 20."""
    common = ['--eval_interval=10', '--lr_decay_iters=20', '--dropout=0.1', '--warmup_iters=3']
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


def test_memory_efficient_training_matches_standard(corpus, tmp_path):
    """--memory_efficient=true (heads' forward+backward one at a time) trains the same as the
    standard step: the same loss curve, with WHS and explicit loss weights."""
    flags = ['--max_iters=6', '--eval_interval=6', '--n_future=3', '--whs=true',
             '--loss_weights=1,0.5,0.25']
    a = run_train(corpus, tmp_path / 'a', *flags)
    b = run_train(corpus, tmp_path / 'b', *flags, '--memory_efficient=true')
    for it in range(1, 7):
        assert b['losses'][it] == pytest.approx(a['losses'][it], abs=1e-4), it


def test_lr_schedule():
    """get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    cfg = T.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=14,
                        max_iters=100)
    lrs = [T.get_lr(it, cfg) for it in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55)
    assert all(x >= y for x, y in zip(lrs[4:15], lrs[5:15]))
    assert lrs[14:] == pytest.approx([0.1] * 6)


# -----------------------------------------------------------------------------
# bad input: one-line errors

def test_missing_data_dir_is_a_user_error(tmp_path):
    """A data_dir without prepared data says how to prepare it."""
    cfg = train_config(tmp_path / 'nothing', tmp_path / 'out', '--max_iters=1')
    one_line_user_error(T.train, cfg, match='prepare.py')


def test_unknown_flag_lists_valid_keys():
    msg = one_line_user_error(T.parse_config, ['--max_iter=5'], match="'max_iter'")
    assert 'max_iters' in msg and 'learning_rate' in msg


@pytest.mark.parametrize('flag,kind', [('--max_iters=abc', 'int'), ('--learning_rate=fast', 'float'),
                                       ('--whs=maybe', 'bool'), ('--max_iters', None)])
def test_wrong_flag_value_is_a_user_error(flag, kind):
    """A value of the wrong type (or no value) names the flag and the expected type."""
    msg = one_line_user_error(T.parse_config, [flag])
    assert flag.split('=')[0].lstrip('-') in msg
    if kind:
        assert kind in msg


def test_flag_values_are_converted():
    cfg = T.parse_config(['--max_iters=7', '--learning_rate=3e-4', '--whs=true', '--bias=0',
                          '--out_dir=x'])
    assert (cfg.max_iters, cfg.learning_rate, cfg.whs, cfg.bias, cfg.out_dir) == \
        (7, 3e-4, True, False, 'x')


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_corrupt_checkpoint_on_resume_is_a_user_error(corpus, ntp_ckpt, tmp_path, damage):
    out = tmp_path / 'out'
    out.mkdir()
    data = open(ntp_ckpt, 'rb').read()
    (out / 'ckpt.pt').write_bytes(data[:len(data) // 3] if damage == 'truncated'
                                  else b'\x80garbage' * 100)
    cfg = train_config(corpus, out, '--init_from=resume', '--max_iters=20')
    one_line_user_error(T.train, cfg, match='corrupt')


def test_missing_checkpoint_on_resume_is_a_user_error(corpus, tmp_path):
    cfg = train_config(corpus, tmp_path / 'out', '--init_from=resume', '--max_iters=20')
    one_line_user_error(T.train, cfg, match='not found')


def test_block_size_beyond_the_adapted_model_is_a_user_error(corpus, ntp_ckpt, tmp_path):
    """Adapting a checkpoint trained with block_size 16 at --block_size=32 is refused."""
    cfg = train_config(corpus, tmp_path / 'out', f'--init_from={ntp_ckpt}', '--block_size=32',
                       '--max_iters=1')
    one_line_user_error(T.train, cfg, match='block_size 32')


@pytest.mark.parametrize('flags,match', [
    (['--whs=true', '--n_future=1'], 'whs'),
    (['--freeze_trunk=true'], 'freeze_trunk'),                      # with init_from=scratch
    (['--head_warmup_iters=5'], 'head_warmup_iters'),               # with init_from=scratch
    (['--attach_layer=3'], 'attach_layer'),                         # n_layer is 2
    (['--head_type=linear', '--attach_layer=1'], 'attach_layer'),
    (['--head_type=mlp'], 'head_type'),
    (['--n_future=0'], 'n_future'),
    (['--loss_weights=1,half'], 'loss_weights'),
    (['--compile=true', '--memory_efficient=true'], 'memory_efficient'),
    (['--log_interval=0'], 'log_interval'),
    (['--block_size=2'], 'block_size'),                             # 2 heads need > 2 positions
    (['--device=tpu'], 'unknown device'),
    (['--loss_weights=1,0.5,0.25'], 'loss_weights'),                # 3 weights for 2 heads
])
def test_incompatible_options_are_user_errors(corpus, tmp_path, flags, match):
    cfg = train_config(corpus, tmp_path / 'out', '--max_iters=1', *flags)
    one_line_user_error(T.train, cfg, match=match)
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_freeze_trunk_with_other_trunk_options_is_a_user_error(corpus, ntp_ckpt, tmp_path):
    cfg = train_config(corpus, tmp_path / 'out', f'--init_from={ntp_ckpt}', '--max_iters=1',
                       '--freeze_trunk=true', '--trunk_lr_scale=0.5')
    one_line_user_error(T.train, cfg, match='freeze_trunk')


def run_train_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_cli_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith('error:') and 'Traceback' not in r.stderr
    return lines[0]


def test_cli_unknown_flag_is_one_line_listing_valid_keys():
    line = assert_cli_error(run_train_cli('--quiet=true', '--n_futur=2'))
    assert 'n_futur' in line and 'n_future' in line and 'max_iters' in line


def test_cli_wrong_type_is_one_line():
    line = assert_cli_error(run_train_cli('--quiet=true', '--max_iters=abc'))
    assert 'max_iters' in line and 'int' in line


def test_cli_missing_data_dir_is_one_line(tmp_path):
    line = assert_cli_error(run_train_cli('--quiet=true', '--device=cpu',
                                          f'--data_dir={tmp_path / "none"}',
                                          f'--out_dir={tmp_path / "out"}'))
    assert 'prepare.py' in line


# -----------------------------------------------------------------------------
# presets

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


@pytest.mark.parametrize('content,match', [("max_iterz = 7\n", "'max_iterz'"),
                                           ("max_iters = 'seven'\n", 'max_iters'),
                                           ("import os\n", 'not `name = value`'),
                                           ("max_iters = 7 +\n", 'cannot read preset')])
def test_bad_preset_is_a_user_error(tmp_path, content, match):
    preset = tmp_path / 'p.py'
    preset.write_text(content)
    one_line_user_error(T.parse_config, [str(preset)], match=match)


def test_missing_preset_is_a_user_error(tmp_path):
    one_line_user_error(T.parse_config, [str(tmp_path / 'nope.py')], match='not found')


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
    msg = one_line_user_error(T.train, cfg, match='loss is nan')
    assert 'iter 6' in msg
    assert sha(out / 'ckpt.pt') == before
    assert [f for f in os.listdir(out) if f != 'ckpt.pt'] == []


def test_divergence_right_before_an_eval_keeps_the_good_checkpoint(corpus, tmp_path):
    """A step that blows the weights up (learning_rate=1e30) immediately followed by an
    evaluation must not overwrite the last good checkpoint with the diverged model: the run
    stops with a UserError about the loss and the earlier checkpoint is byte-for-byte intact."""
    out = tmp_path / 'out'
    run_train(corpus, out, '--max_iters=4', '--eval_interval=4')
    before = sha(out / 'ckpt.pt')
    cfg = train_config(corpus, out, '--init_from=resume', '--max_iters=10', '--eval_interval=1',
                       '--learning_rate=1e30', '--warmup_iters=0')
    one_line_user_error(T.train, cfg, match='loss')
    assert sha(out / 'ckpt.pt') == before
    ckpt = M.load_checkpoint(str(out / 'ckpt.pt'))
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
