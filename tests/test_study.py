"""The study driver runs end to end: the strategies table with paired differences, the WHS mix,
convergence, probes and the size curve; finished work is reused; bad flags are one-line errors."""
import json
import os
from dataclasses import replace

import pytest
import torch

import convert as C

import study
from conftest import one_line_error


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory):
    """A miniature study on a small counting corpus: one table size (S, 2 seeds), a size curve
    over XS and S, probes, the convergence check and the sweep."""
    tmp = tmp_path_factory.mktemp('study')
    sizes = dict(study.SIZES, S=(2, 2, 32), XS=(1, 1, 16))
    corpus = tmp / 'tiny.txt'
    corpus.write_text(study.counting_text(1500))
    cfg = study.StudyConfig(out_dir=str(tmp / 'study'), corpora=str(corpus), sizes='S',
                            curve_sizes='XS,S', seeds=2, base_iters=20, adapt_iters=8,
                            head_warmup_iters=3, batch_size=4, block_size=32, eval_iters=1,
                            positions=40, curve_positions=16, probe_positions=200,
                            decode_prompts=2, decode_tokens=8, device='cpu')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, 'SIZES', sizes)
        text, summary = study.run_study(cfg, log=lambda message: None)
    return cfg, text, summary


def test_strategies_table_has_every_row_and_column(tiny_study):
    cfg, text, summary = tiny_study
    cell = summary['results']['cells']['tiny / S']
    strategies = [row['strategy'] for row in cell['table']]
    assert strategies[:3] == ['FT NTP + marginalization (exact, all V)',
                              'FT NTP + marginalization (top_k=5)',
                              'FT NTP + marginalization (top_k=1)']
    assert strategies[3:] == list(study.STRATEGIES) + [study.SCRATCH]
    for row in cell['table']:
        for col in ('next_top5', 'second_top5', 'next_top1', 'second_top1'):
            assert 0.0 <= row[col] <= 1.0 and row[col + '_spread'] >= 0.0
        assert row['next_top1'] <= row['next_top5'] and row['second_top1'] <= row['second_top5']
    for row in cell['table'][3:]:  # every MTP model decodes; greedy speculative == vanilla
        assert 1.0 <= row['tau'] <= cfg.n_future and row['speedup'] > 0 and row['identical']
    assert [s['attach_layer'] for s in cell['sweep']] == [0, 1]
    # the markdown table: one line per strategy, 7 columns
    table = text[text.index('| strategy |'):].split('\n\n')[0].splitlines()[2:]
    assert len(table) == len(strategies) and all(line.count('|') == 8 for line in table)
    assert os.path.isfile(os.path.join(cfg.out_dir, 'study_full.json'))


def test_paired_differences_are_per_seed_differences_to_joint_fine_tuning(tiny_study):
    """Every row but joint fine-tuning, minus joint fine-tuning of the same seed."""
    _, _, summary = tiny_study
    cell = summary['results']['cells']['tiny / S']
    joint = [next(r for r in rows if r['strategy'] == 'joint fine-tuning')
             for rows in cell['per_seed']]
    assert len(cell['paired']) == len(cell['table']) - 1
    for entry in cell['paired']:
        rows = [next(r for r in seed_rows if r['strategy'] == entry['strategy'])
                for seed_rows in cell['per_seed']]
        diffs = [r['second_top1'] - j['second_top1'] for r, j in zip(rows, joint)]
        assert entry['second_top1']['diffs'] == pytest.approx(diffs)
        assert entry['second_top1']['mean'] == pytest.approx(sum(diffs) / 2)
        sd = abs(diffs[0] - diffs[1]) / 2 ** 0.5
        assert entry['second_top1']['ci95'] == pytest.approx(12.71 * sd / 2 ** 0.5)


def test_whs_mix_convergence_probes_and_size_curve_are_reported(tiny_study):
    cfg, text, summary = tiny_study
    cell = summary['results']['cells']['tiny / S']
    whs = next(r for r in cell['table'] if r['strategy'] == 'diff. LR + WHS')['whs']
    assert len(whs) == cfg.n_future and len(whs[0]) == 2  # heads x (h_0, h_attach)
    conv = summary['results']['convergence']
    assert sorted(conv) == ['tiny / S', 'tiny / XS'] and 'gain_2x' not in conv['tiny / XS']
    s0 = conv['tiny / S']
    assert len(s0['base']) == len(s0['ft']) == len(s0['base_train']) == 2  # seeds
    assert s0['gain_2x'] == pytest.approx(s0['base'][0] - s0['base_2x_loss'])
    assert sorted(summary['results']['probes']) == ['tiny / S', 'tiny / XS']
    probes = summary['results']['probes']['tiny / S']
    assert probes['layers'] == [0, 1, 2]
    for readout in ('lens', 'probe'):
        for metric in ('top1', 'top5'):
            assert len(probes[readout][metric]) == 2  # x_{t+1}, x_{t+2}
            assert all(0 <= v <= 1 for row in probes[readout][metric] for v in row)
    curve = summary['results']['curve']['tiny']
    assert sorted(curve) == ['S', 'XS'] and curve['XS']['params'] < curve['S']['params']
    for point in curve.values():
        assert len(point['marginal']['top1']) == 3 and len(point['heads']['top1']) == 3
        assert point['marginal']['mass'][2] == pytest.approx(1.0)  # exact: all of V
    shares = next(r for r in cell['per_seed'][0] if r['strategy'] == 'diff. LR + WHS')['whs_share']
    assert all(sum(head) == pytest.approx(1.0) for head in shares)
    for section in ('## Convergence', '## Strategies', '## Layer probes', '## Size curve',
                    'Paired differences, 2nd token', 'Paired differences, next token',
                    'WHS of diff. LR + WHS', 'identical to vanilla: yes'):
        assert section in text


def test_a_finished_study_is_reused_not_recomputed(tiny_study, monkeypatch):
    """Runs and evaluations on disk are reused: running the same study again trains nothing."""
    cfg, text, _ = tiny_study
    monkeypatch.setattr(study.trainer, 'train', lambda *a, **k: pytest.fail('trained again'))
    monkeypatch.setattr(study, 'SIZES', dict(study.SIZES, S=(2, 2, 32), XS=(1, 1, 16)))
    again, _ = study.run_study(cfg, log=lambda message: None)
    assert again.split('\n', 1)[1] == text.split('\n', 1)[1]  # (line 1: the compute time)


def test_a_retrained_base_retrains_every_run_adapted_from_it(tmp_path, monkeypatch):
    """Reuse follows lineage: changing base_iters retrains the base AND the FT NTP run adapted
    from it (whose own config, init_from=<the base's path>, did not change)."""
    trained = []
    real_train = study.trainer.train

    def recording_train(tc):
        trained.append(os.path.basename(tc.out_dir))
        return real_train(tc)
    monkeypatch.setattr(study.trainer, 'train', recording_train)
    monkeypatch.setattr(study, 'SIZES', dict(study.SIZES, XS=(1, 1, 16)))
    corpus = tmp_path / 'tiny.txt'
    corpus.write_text(study.counting_text(600))
    cfg = study.StudyConfig(out_dir=str(tmp_path / 'study'), corpora=str(corpus), batch_size=4,
                            block_size=16, eval_iters=1, base_iters=6, adapt_iters=2, device='cpu')
    data_dir = study.prepare_corpus(str(corpus), cfg)
    for base_iters, expected in ((6, ['base', 'ft']), (6, []), (7, ['base', 'ft'])):
        trained.clear()
        study.run_cell(replace(cfg, base_iters=base_iters), data_dir, 'XS', 0, print,
                       strategies=False)
        assert trained == expected, (base_iters, trained)

    def stopped(tc):
        raise KeyboardInterrupt
    monkeypatch.setattr(study.trainer, 'train', stopped)  # a retrain stopped midway: its folder
    with pytest.raises(KeyboardInterrupt):               # no longer claims a finished run
        study.run_cell(replace(cfg, base_iters=8), data_dir, 'XS', 0, print, strategies=False)
    assert not list((tmp_path / 'study' / 'runs').glob('*/base/done.json'))


def test_paired_next_token_differences_work_with_a_bpe_vocabulary(monkeypatch):
    """With a large vocabulary the FT NTP reference row is top_k=50, not 'exact, all V': the
    paired next-token differences are taken to it (once a StopIteration with --seeds >= 2)."""
    def row(strategy, value):
        return dict(strategy=strategy, next_top1=value, next_top5=value, second_top1=value,
                    second_top5=value, identical=True)

    def run_cell(cfg, data_dir, size, seed, log, strategies=True):
        rows = [row('FT NTP + marginalization (top_k=50)', 0.5 + seed / 10),
                row('joint fine-tuning', 0.4), row('diff. LR', 0.3)]
        return dict(rows=rows, base_loss=1.0, base_train_loss=1.0, ft_loss=1.0)
    monkeypatch.setattr(study, 'prepare_corpus', lambda corpus, cfg: 'data')
    monkeypatch.setattr(study, 'run_cell', run_cell)
    monkeypatch.setattr(study, 'run_extras', lambda *args: {})
    cfg = study.StudyConfig(corpora='text.txt', sizes='S', curve_sizes='', seeds=2,
                            init_from='EleutherAI/pythia-70m', sweep=False, convergence='')
    results = dict(cells={}, curve={}, probes={}, convergence={})
    study.run_corpus(cfg, 'text.txt', results, log=print)
    cell = results['cells']['text / EleutherAI/pythia-70m']
    assert [r['strategy'] for r in cell['paired_next']] == ['joint fine-tuning', 'diff. LR']
    assert cell['paired_next'][0]['next_top1']['diffs'] == pytest.approx([-0.1, -0.2])
    assert 'next token, every MTP model minus FT NTP' in '\n'.join(
        study.markdown_strategies('text', cell))


# -----------------------------------------------------------------------------
# the pretraining lab: NTP and MTP from scratch at matched compute

@pytest.fixture(scope='module')
def tiny_lab(tmp_path_factory):
    """The lab (table=pretrain) on a small counting corpus: one size, 2 seeds."""
    tmp = tmp_path_factory.mktemp('lab')
    corpus = tmp / 'tiny.txt'
    corpus.write_text(study.counting_text(1500))
    cfg = study.StudyConfig(table='pretrain', out_dir=str(tmp / 'lab'), corpora=str(corpus),
                            sizes='qS', curve_sizes='', seeds=2, base_iters=30, batch_size=4,
                            block_size=32, eval_iters=2, positions=40, probe_positions=200,
                            decode_prompts=2, decode_tokens=8, device='cpu')
    return cfg, *study.run_study(cfg, log=lambda message: None)


@pytest.mark.slow
def test_the_lab_trains_every_run_from_scratch_at_ntps_compute(tiny_lab):
    """Every run of PRETRAIN, each for the iterations that spend base_iters NTP iterations'
    FLOPs (so MTP runs get fewer), its val loss recorded at every evaluation; paired
    differences to NTP; every MTP run decodes greedy speculative == vanilla."""
    cfg, text, summary = tiny_lab
    cell = summary['results']['pretrain']['tiny / qS']
    assert [row['strategy'] for row in cell['table']] == list(study.PRETRAIN)
    for rows in cell['per_seed']:
        flops = {row['strategy']: row['curve'][-1][0] for row in rows}  # at the last iteration
        per_iter = {row['strategy']: row['curve'][-1][0] / row['iters'] for row in rows}
        for name, spent in flops.items():
            assert abs(spent - flops['NTP']) <= per_iter[name] / 2, name  # the same, +- half a step
        assert rows[0]['iters'] == cfg.base_iters and all(r['iters'] < cfg.base_iters
                                                          for r in rows[1:])
    assert [row['strategy'] for row in cell['paired']] == list(study.PRETRAIN)[1:]
    for row in cell['table'][1:]:
        assert 1.0 <= row['tau'] <= 4 and row['identical'] and row['tau_sampled'] >= 1.0
    assert len(cell['probes']) == cfg.seeds and '## Where the layers read the next tokens' in text
    assert all(len(line.split('|')) == 13 for line in text.splitlines()
               if line.startswith('| MTP 4 '))


def test_convergence_is_read_at_fixed_fractions_of_each_runs_flops():
    """Not at each run's last evaluations, which a short run packs into its last iterations."""
    curve = [(100, 3.0), (470, 2.5), (650, 2.3), (790, 2.2), (800, 2.1)]
    assert [study.at_fraction(curve, f) for f in (0.6, 0.8, 1.0)] == [2.5, 2.3, 2.1]
    assert study.at_fraction([(10, 1.5)], 0.6) == 1.5  # one evaluation: no crash


def test_the_python_corpus_is_the_standard_librarys_source_in_printable_ascii():
    text = study.python_text(20_000)
    assert len(text) == 20_000 and text == study.python_text(20_000)  # the same every time
    assert 'def ' in text and set(text) <= {'\n', *map(chr, range(32, 127))}


# (study.py's arguments, a fragment of the one-line message)
STUDY_ERRORS = [
    (['--nope=1'], 'unknown option'),
    (['--seeds=two'], 'expects int'),
    (['--preset=huge'], 'unknown preset'),
    (['--sizes=S,Q'], 'unknown sizes'),
    (['--corpora=,'], 'no corpora'),
    (['--corpora=missing.txt', '--out_dir=/nonexistent/x'], 'corpus not found'),
    (['--corpora=shakespeare_char', '--shakespeare=missing.txt'], 'not found at missing.txt'),
    (['--preset=paper', '--corpora=x.txt'], 'add --init_from=EleutherAI/pythia-410m'),
    (['--init_from=gpt2', '--sweep=false'], 'init_from adapts one pretrained model'),
    ([f'--out_dir={__file__}/x'], 'cannot write to out_dir'),    # under a file: before compute
    (['--preset=paper', '--init_from=gpt2'], '--corpora=<a text file>'),  # not the CPU corpora
    (['--table=both'], 'table must be strategies or pretrain'),
    (['--corpora=counting,counting'], 'listed twice'),
    (['--preset=pretrain', '--init_from=gpt2'], 'trains every model from scratch'),
]


@pytest.mark.parametrize('args,fragment', STUDY_ERRORS, ids=[' '.join(a) for a, _ in STUDY_ERRORS])
def test_bad_flags_are_one_line_user_errors(args, fragment):
    one_line_error(study.main, args, match=fragment)


# -----------------------------------------------------------------------------
# the paper's setting: a pretrained GPT-NeoX (Pythia) as the base

@pytest.mark.slow
def test_paper_preset_runs_end_to_end_on_a_tiny_random_pythia(tmp_path, monkeypatch):
    """--preset=paper --init_from=EleutherAI/pythia-… takes the command's whole code path here:
    the Pythia name goes through convert.from_pretrained and transformers (whose downloads are
    replaced by a tiny random GPTNeoXForCausalLM and a local tokenizer), the corpus is read by
    that tokenizer, the base is the pretrained model itself (moved by at most 1e-30), and the table
    has the marginalization baseline and every strategy, decoded losslessly."""
    transformers = pytest.importorskip('transformers', reason='optional dependency not installed')
    from conftest import local_tokenizer
    from common import load_checkpoint
    from heads import MTPGPT
    name = 'EleutherAI/pythia-tiny'
    corpus = tmp_path / 'text.txt'
    corpus.write_text(study.counting_text(1500))
    tok_dir = local_tokenizer(tmp_path / 'tok', corpus.read_text())
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25)).eval()
    downloads = {transformers.AutoModelForCausalLM: hf, transformers.AutoTokenizer:
                 transformers.AutoTokenizer.from_pretrained(tok_dir)}
    for cls, obj in downloads.items():
        monkeypatch.setattr(cls, 'from_pretrained', staticmethod(
            lambda model_name, *a, _obj=obj, **k: _obj if model_name == name else 1 / 0))
    out = tmp_path / 'study'
    study.main(['--preset=paper', f'--init_from={name}', f'--corpora={corpus}', f'--out_dir={out}',
                '--adapt_iters=4', '--head_warmup_iters=2', '--batch_size=4', '--block_size=32',
                '--eval_iters=1', '--positions=24', '--decode_prompts=2', '--decode_tokens=8',
                '--device=cpu'])
    with open(out / 'study_paper.json') as f:
        summary = json.load(f)
    text = (out / 'study_paper.md').read_text()
    cell = summary['results']['cells'][f'text / {name}']
    assert [row['strategy'] for row in cell['table']] == [
        'FT NTP + marginalization (top_k=50)', 'FT NTP + marginalization (top_k=5)',
        'FT NTP + marginalization (top_k=1)'] + list(study.STRATEGIES)
    assert all(row['identical'] for row in cell['table'][3:])
    assert summary['results']['probes'] == {} and summary['results']['curve'] == {}
    [base] = (out / 'runs').glob(f'text-*-{study.slug(name)}-{study.slug(name)}-s0/base/ckpt.pt')
    base = load_checkpoint(str(base))  # (the corpus's data dir: text-<a hash of its path>)
    assert base['meta']['kind'] == 'hf' and base['model_args']['rotary_pct'] == 0.25
    for key, value in MTPGPT.from_gpt(C.from_hf(hf)).state_dict().items():  # LR 1e-30
        assert (base['model'][key] - value).abs().max() <= 1e-29, key
    assert '## Strategies' in text


def test_corpora_are_prepared_apart_and_an_empty_one_is_a_one_line_error(tmp_path):
    """Two corpora named a.txt in different folders are two datasets (not one reused); an empty
    text is a one-line error, not a traceback."""
    for folder in ('x', 'y'):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'a.txt').write_text(folder * 3000)
    cfg = study.StudyConfig(out_dir=str(tmp_path / 'out'))
    dirs = [study.prepare_corpus(str(tmp_path / f / 'a.txt'), cfg) for f in ('x', 'y')]
    assert dirs[0] != dirs[1]
    assert [open(os.path.join(d, 'meta.json')).read().count(f) for d, f in zip(dirs, 'xy')] == \
        [1, 1]
    (tmp_path / 'empty.txt').write_text('')
    one_line_error(study.prepare_corpus, str(tmp_path / 'empty.txt'), cfg,
                   match=('cannot prepare corpus', 'empty'))


def test_two_corpora_of_one_file_name_keep_a_row_each_in_the_report(tmp_path, monkeypatch):
    """x/a.txt and y/a.txt: not one key 'a' (the second's results silently replacing the
    first's), but keyed by their data dirs, a-<hash of the path>."""
    cfg = study.StudyConfig(table='pretrain', out_dir=str(tmp_path / 'out'), sizes='qS', seeds=1)
    monkeypatch.setattr(study, 'run_pretrain_cell', lambda *args: ([dict(strategy='NTP')], {}))
    results = dict(cells={}, curve={}, probes={}, convergence={}, pretrain={})
    for folder in ('x', 'y'):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'a.txt').write_text(folder * 3000)
        study.run_corpus(cfg, str(tmp_path / folder / 'a.txt'), results, log=print)
    assert len(results['pretrain']) == 2 and 'a / qS' in results['pretrain']


@pytest.mark.parametrize('results_dir', ['{tmp}/afile/r', pytest.param(
    '/proc/no-such-folder', marks=pytest.mark.skipif(not os.path.isdir('/proc/self'),
                                                     reason='a folder no one can write: Linux'))])
def test_an_unwritable_results_dir_is_said_before_any_compute(tmp_path, results_dir):
    """Under a file, or where no file can be made (even by root): before the compute."""
    (tmp_path / 'afile').write_text('x')
    one_line_error(study.main, [f"--out_dir={tmp_path / 'o'}",
                                f"--results_dir={results_dir.format(tmp=tmp_path)}"],
                   match=('cannot write to results_dir', 'is not a writable folder'))
    assert not list((tmp_path / 'o').rglob('*.pt'))
