"""Specification of the plumbing every script shares (common.py): --help pages generated from
the config dataclasses, one-line errors on the command line, checkpoint files, and the model a
checkpoint describes (old checkpoints included)."""
import importlib
import inspect
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, fields

import pytest
import torch

import model as M
from common import (UserError, cli, flag, help_text, load_checkpoint, load_model,
                    model_from_checkpoint, save_checkpoint)
from writers import check_out_dir, dead_writer, leave_mark, start_time
from conftest import one_line_error, run_cli, tiny_config, tiny_gpt, tiny_mtp
from data.text import Tokenizer


def max_diff(a, b):
    return (a - b).abs().max().item()


def tokens(T=12, vocab=40, B=2, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# --help: every script lists its flags, their defaults and what they do

# (module, the arguments before --help, its config dataclass, names that are not flags there)
HELP_PAGES = [('train', [], 'TrainConfig'),
              ('sample', [], 'SampleConfig'),
              ('marginalize', [], 'MarginalizeConfig'),
              ('distill', [], 'DistillConfig'),
              ('study', [], 'StudyConfig'),
              ('probes', [], 'ProbeConfig'),
              ('data.prepare', [], 'PrepareConfig'),
              ('bench', ['decode'], 'DecodeBench'),
              ('bench', ['train'], 'TrainBench'),
              ('bench', ['marginalize'], 'MarginalizeBench')]
CONFIGS = [(module, config) for module, _, config in HELP_PAGES]


def config_class(module, config):
    """A script's config dataclass (train.py's, TrainConfig, is common.py's)."""
    return getattr(importlib.import_module(module), config, None) or \
        getattr(importlib.import_module('common'), config)


def help_page(module, argv, capsys):
    """What main(argv) prints before it exits; asserts it exits with status 0."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def shown(default):
    """How a default is written in --help: as is, or repr() when not printable (e.g. '\\n')."""
    return repr(default) if isinstance(default, str) and not default.isprintable() else default


@pytest.mark.parametrize('flag', ['--help', '-h'])
@pytest.mark.parametrize('module,section,config', HELP_PAGES,
                         ids=[' '.join([m, *s]) for m, s, _ in HELP_PAGES])
def test_help_lists_every_flag_with_its_default_and_description_then_exits_0(
        module, section, config, flag, capsys):
    """`<script> --help` (or -h) prints the config dataclass's docstring, then one line per flag
    in the dataclass's order: --name=default and its description (common.flag), and
    exits with status 0 before doing anything else. The page lists exactly the flags the
    script takes: a field it leaves out (a config that extends another script's, e.g.
    distill.py's of train.py's, decides some fields itself) is refused as an unknown option."""
    cls = config_class(module, config)
    out = help_page(module, [*section, flag], capsys)
    assert out.startswith(inspect.getdoc(cls))
    lines = out.split('flags (--name=value):\n', 1)[1].rstrip('\n').splitlines()
    listed = [line.split('=', 1)[0].strip().removeprefix('--') for line in lines]
    names = [f.name for f in fields(cls)]
    assert listed and listed == [name for name in names if name in listed], listed
    docs, defaults = descriptions(cls), cls()
    for line, name in zip(lines, listed):
        prefix = f"  --{name}={shown(getattr(defaults, name))} "
        assert line.startswith(prefix), (line, prefix)
        assert line[len(prefix):].strip() == docs[name], line
    main = importlib.import_module(module).main
    for name in set(names) - set(listed):
        one_line_error(main, [*section, f'--{name}=1'], match='unknown option')


def test_bench_help_lists_every_section(capsys):
    """`bench.py --help` shows the help page of every section (decode, train, marginalize)."""
    pages = [help_page('bench', [*section, '--help'], capsys)
             for module, section, _ in HELP_PAGES if module == 'bench']
    everything = help_page('bench', ['--help'], capsys)
    assert len(pages) == 3
    for page in pages:
        assert page.strip() in everything


def descriptions(cls):
    """{field: its --help description} of a config dataclass."""
    return {f.name: f.metadata.get('help', '') for f in fields(cls)}


@pytest.mark.parametrize('module,config', CONFIGS, ids=[c for _, c in CONFIGS])
def test_every_config_field_has_a_description(module, config):
    """Every field of every script's config dataclass is a flag(default, description) with a
    non-empty description, so no flag is undocumented in --help."""
    cls = config_class(module, config)
    for name, description in descriptions(cls).items():
        assert description.strip(), f"{config}.{name} has no description"


@dataclass
class Example:
    """python example.py [--name=value ...]
What the example does."""
    alpha: int = flag(1, "the first flag")
    beta: str = flag('x', "a description that goes on "
                          "over two lines")
    gamma: float = flag(0.5, "(see alpha)")
    delta: str = flag('\n', "not printable: shown as repr")


def test_help_text_lays_the_descriptions_out_under_the_docstring():
    """flag(default, description) is a dataclass field with that default; help_text shows the
    docstring, then every flag: --name=default and its description."""
    assert Example().beta == 'x' and Example(beta='y').beta == 'y'
    assert help_text(Example(), asdict(Example())).splitlines() == [
        'python example.py [--name=value ...]', 'What the example does.', '',
        'flags (--name=value):',
        "  --alpha=1     the first flag",
        "  --beta=x      a description that goes on over two lines",
        "  --gamma=0.5   (see alpha)",
        "  --delta='\\n'  not printable: shown as repr"]


def test_help_on_the_command_line_exits_0():
    """The real command line: `python train.py --help` prints the page and exits with 0."""
    r = run_cli('train.py', '--help')
    assert r.returncode == 0, r.stderr
    assert 'flags (--name=value):' in r.stdout and '--max_iters=3500' in r.stdout


# -----------------------------------------------------------------------------
# cli(): what a user can get wrong ends the script with one line

def test_cli_ends_a_user_error_with_one_line_and_lets_bugs_through(monkeypatch):
    """cli(main) calls main(sys.argv[1:]); a UserError (or one of `errors`) becomes
    SystemExit('error: <message>') -- exit status 1, the line on stderr; any other exception
    is a bug and propagates with its traceback."""
    monkeypatch.setattr(sys, 'argv', ['script.py', '--x=1'])
    seen = []

    def main(argv):
        seen.append(argv)
        raise UserError(f"bad flags {argv}")
    with pytest.raises(SystemExit) as e:
        cli(main)
    assert seen == [['--x=1']] and e.value.code == "error: bad flags ['--x=1']"

    def buggy(argv):
        raise ValueError('a bug')
    with pytest.raises(ValueError):
        cli(buggy)
    with pytest.raises(SystemExit) as e:
        cli(buggy, errors=(ValueError,))
    assert e.value.code == 'error: a bug'


# -----------------------------------------------------------------------------
# checkpoints

def test_save_checkpoint_is_atomic_and_loads(tmp_path):
    """save_checkpoint leaves only the final file (no temp files) and it loads back."""
    model = tiny_gpt()
    path = tmp_path / 'sub' / 'ckpt.pt'
    obj = dict(model=model.state_dict(), model_args=dict(tiny_config().__dict__), iter_num=3)
    save_checkpoint(obj, str(path))
    save_checkpoint(obj, str(path))  # overwriting works too
    assert os.listdir(tmp_path / 'sub') == ['ckpt.pt']
    ck = load_checkpoint(str(path))
    assert ck['iter_num'] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(ck['model'][k], v)


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """A full disk mid-save (torch reports it as 'unexpected pos ...'): one line that says the
    write failed and the old checkpoint is unchanged; the partial temp file is gone."""
    path = tmp_path / 'ckpt.pt'
    obj = dict(model=tiny_gpt().state_dict(), model_args=dict(tiny_config().__dict__))
    save_checkpoint(obj, str(path))
    before = path.read_bytes()

    def full_disk(obj, f):
        open(f, 'wb').write(b'half a checkpoint')
        raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0')
    monkeypatch.setattr(torch, 'save', full_disk)
    one_line_error(save_checkpoint, obj, str(path),
                   match=('cannot write checkpoint', 'unexpected pos', 'MB free', 'unchanged'))
    assert os.listdir(tmp_path) == ['ckpt.pt'] and path.read_bytes() == before


def test_dead_writers_temp_files_are_removed_and_live_ones_kept(tmp_path):
    """ckpt.pt.tmp.<pid> of a writer that died (killed mid-save) is removed when a run starts
    (check_out_dir) and at the next save; a live writer's is not touched."""
    obj = dict(model=tiny_gpt().state_dict(), model_args=dict(tiny_config().__dict__))
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    live = tmp_path / f'ckpt.pt.tmp.{os.getppid()}'
    live.write_bytes(b'being written')
    for clean_up in (lambda: check_out_dir(str(tmp_path)),
                     lambda: save_checkpoint(obj, str(tmp_path / 'ckpt.pt'))):
        (tmp_path / f'ckpt.pt.tmp.{dead.pid}').write_bytes(b'left by a kill' * 1000)
        clean_up()
        assert not (tmp_path / f'ckpt.pt.tmp.{dead.pid}').exists() and live.exists()


@pytest.mark.skipif(not os.path.exists('/proc/self/stat'), reason='start times: Linux /proc')
def test_a_mark_names_its_writer_even_after_its_process_id_is_reused(tmp_path):
    """writer.<pid> and switch.<pid> hold their writer's start time: a live process that reused
    a dead writer's id is not taken for it; the writer itself, or an unmarked file, still is."""
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        for name in ('writer', 'switch'):
            (tmp_path / f'{name}.{live.pid}').write_text('1')  # the dead writer's start time
            assert dead_writer(str(tmp_path / f'{name}.{live.pid}'))
        (tmp_path / f'writer.{live.pid}').write_text(start_time(live.pid))  # its own
        assert not dead_writer(str(tmp_path / f'writer.{live.pid}'))
        (tmp_path / f'ckpt.pt.tmp.{live.pid}').write_bytes(b'1')  # data, not a mark: the id
        assert not dead_writer(str(tmp_path / f'ckpt.pt.tmp.{live.pid}'))
    finally:
        live.kill()
        live.wait()
    leave_mark(str(tmp_path / f'writer.{os.getpid()}'))
    assert (tmp_path / f'writer.{os.getpid()}').read_text() == start_time(os.getpid()) != ''


def test_a_folder_or_a_link_to_nowhere_given_as_a_file_is_named_as_what_it_is(tmp_path):
    """Not 'not found' for a folder, nor '[Errno 17] File exists' for a link in a loop."""
    from data.text import read_text
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    assert one_line_error(load_checkpoint, str(tmp_path)) == \
        f"checkpoint {tmp_path} is a directory, not a file"
    assert 'is a link that leads nowhere' in one_line_error(load_checkpoint,
                                                            str(tmp_path / 'loop'))
    assert 'prompt file' in one_line_error(read_text, str(tmp_path), 'prompt file')


def test_an_out_dir_that_is_a_link_in_a_loop_or_a_file_is_named_as_what_it_is(tmp_path):
    from writers import writing
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    (tmp_path / 'afile').write_text('x')
    for name, what in (('loop', 'a link that leads nowhere (broken, or a loop)'),
                       ('afile', 'a file, not a folder')):
        for check in (lambda: check_out_dir(str(tmp_path / name)),
                      lambda: writing(str(tmp_path / name), 'out_dir').__enter__()):
            assert one_line_error(check) == f"cannot write to out_dir {tmp_path / name}: {what}"


def test_checking_an_out_dir_creates_nothing(tmp_path):
    """A run refused after the check (distill.py's data checks) leaves no empty folder."""
    check_out_dir(str(tmp_path / 'a' / 'b'))
    assert os.listdir(tmp_path) == []


def test_load_checkpoint_errors_are_one_line(tmp_path):
    """Missing, truncated, garbage and non-nanoMTP files raise UserError with one line."""
    good = tmp_path / 'good.pt'
    save_checkpoint(dict(model=tiny_gpt().state_dict(), model_args={}), str(good))
    data = good.read_bytes()
    trunc = tmp_path / 'trunc.pt'
    trunc.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'this is not a checkpoint\x00\x01\x02' * 10)
    empty = tmp_path / 'empty.pt'
    empty.write_bytes(b'')
    other = tmp_path / 'other.pt'
    torch.save([1, 2, 3], str(other))

    assert 'not found' in one_line_error(load_checkpoint, str(tmp_path / 'missing.pt'))
    assert 'corrupt' in one_line_error(load_checkpoint, str(trunc))
    assert 'corrupt' in one_line_error(load_checkpoint, str(garbage))
    assert 'corrupt' in one_line_error(load_checkpoint, str(empty))
    assert 'not a nanoMTP checkpoint' in one_line_error(load_checkpoint, str(other))


def test_model_from_checkpoint_roundtrip_and_mismatch():
    """A checkpoint's model_args + weights rebuild the same model; weights that do not match
    model_args are a one-line UserError."""
    mtp = tiny_mtp(n_future=2, whs=True).eval()
    ckpt = dict(model=mtp.state_dict(), model_args=asdict(mtp.config))
    back = model_from_checkpoint(ckpt).eval()
    x = tokens()
    with torch.no_grad():
        assert max_diff(back(x)[0], mtp(x)[0]) == 0
    bad = dict(ckpt, model_args=dict(ckpt['model_args'], n_future=3))
    one_line_error(model_from_checkpoint, bad)


def test_an_old_checkpoint_with_softmax_whs_loads_as_the_same_mix():
    """Checkpoints written before WHS had coefficients store softmax logits (heads.i.whs_logits,
    the mix was softmax(logits)); they load with c = softmax(logits): the same logits."""
    model = tiny_mtp(n_future=2, whs=True, attach_layer=1)
    logits = torch.tensor([[0.3, 1.5], [-1.0, 2.0]])
    with torch.no_grad():
        for head, w in zip(model.heads, logits):
            head.whs_coef.copy_(torch.softmax(w, 0))
    old_state = {k.replace('whs_coef', 'whs_logits'): v for k, v in model.state_dict().items()}
    for i, w in enumerate(logits):
        old_state[f'_orig_mod.heads.{i}.whs_logits'] = w  # also through torch.compile's prefix
        del old_state[f'heads.{i}.whs_logits']
    back = model_from_checkpoint(dict(model=old_state, model_args=asdict(model.config))).eval()
    x = tokens()
    with torch.no_grad():
        assert max_diff(back(x)[0], model(x)[0]) <= 1e-6
    assert torch.allclose(back.whs_weights(), torch.softmax(logits, 1))


OLD_FORMATS = {  # how earlier versions stored these weights, and their model_args
    'resblock (6118b76)': (dict(head_type='resblock', bias=True),
                           lambda k: re.sub(r'^(heads\.\d+)\.linear\.', r'\1.resblock.linear.', k),
                           {}),
    'linear (before the ResBlock module)': (dict(head_type='resblock', bias=True), lambda k: k,
                                            {'head_type': 'linear'}),
    'sequential (6118b76: head 1 had slot 0)': (
        dict(head_type='sequential', whs=True),
        lambda k: re.sub(r'^heads\.(\d+)\.', lambda m: f"heads.{int(m[1]) + 1}.", k)
        .replace('heads.whs_coef', 'heads.1.whs_coef'), {}),
    'block (before head_type and head_attention)': (dict(head_type='block'), lambda k: k,
                                                    {'head_type': None, 'head_attention': None}),
}


@pytest.mark.parametrize('kw,rename,args', list(OLD_FORMATS.values()), ids=list(OLD_FORMATS))
def test_an_old_checkpoint_loads_as_the_same_model(tmp_path, kw, rename, args):
    """Checkpoints of earlier versions (weights under older names, model_args with older names
    or without today's fields) load, through model_from_checkpoint and load_model, as the model
    they were made from: the same logits for every head."""
    model = tiny_mtp(n_future=3, **kw)
    with torch.no_grad():
        for p in model.heads.parameters():  # away from the identity init: the weights matter
            p.normal_(0, 0.5)
    old_state = {rename(k): v for k, v in model.state_dict().items()}
    old_args = {k: v for k, v in {**asdict(model.config), **args}.items() if v is not None}
    old = dict(model=old_state, model_args=old_args)
    path = str(tmp_path / 'old.pt')
    save_checkpoint({**old, 'config': {}, 'meta': {}}, path)
    x = tokens()
    with torch.no_grad():
        want, _ = model(x)
        assert max_diff(want[:, :, 2], want[:, :, 0]) > 1e-3
        for back in (model_from_checkpoint(old).eval(), load_model(path)[0]):
            assert back.config.head_type == model.config.head_type
            assert max_diff(back(x)[0], want) == 0
    # the same weights under a name that is neither an old nor the new one do not load
    broken = {k.replace('heads.2.', 'heads.2.proj.'): v for k, v in old_state.items()}
    one_line_error(model_from_checkpoint, dict(old, model=broken))
    assert M.UserError is UserError  # model.py's UserError is the one common.py raises


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(tmp_path):
    """nan or inf weights would decode token 0 (or crash) and train on nan: one line at load."""
    model = tiny_mtp()
    state = model.state_dict()
    state['transformer.h.0.mlp.c_fc.weight'][0, 0] = float('nan')
    save_checkpoint(dict(model=state, model_args=asdict(model.config)), str(tmp_path / 'c.pt'))
    one_line_error(load_model, str(tmp_path / 'c.pt'),
                   match=('non-finite', 'transformer.h.0.mlp.c_fc.weight'))


def test_an_error_about_unknown_characters_stays_short():
    tokenizer = Tokenizer(dict(kind='char', chars='ab'))
    with pytest.raises(ValueError) as e:
        tokenizer.encode(''.join(map(chr, range(200, 400))))
    assert len(str(e.value)) < 120 and 'and 180 more' in str(e.value)
