"""The study driver runs end to end, rejects bad flags in one line, and the README shows what it
printed."""
import os

import pytest

import study
from conftest import one_line_error


def test_study_runs_end_to_end_and_its_table_has_every_row_and_column(tmp_path, monkeypatch):
    monkeypatch.setitem(study.SIZES, 'S', (2, 2, 32))
    corpus = tmp_path / 'tiny.txt'
    corpus.write_text(study.counting_text(1500))
    cfg = study.StudyConfig(out_dir=str(tmp_path / 'study'), corpora=str(corpus), sizes='S',
                            seeds=2, base_iters=20, adapt_iters=8, head_warmup_iters=3,
                            batch_size=4, block_size=32, eval_iters=1, positions=40,
                            decode_prompts=2, decode_tokens=8, device='cpu')
    text, summary = study.run_study(cfg, log=lambda message: None)
    cell = summary['results']['tiny / S']
    strategies = [row['strategy'] for row in cell['table']]
    assert strategies[:3] == ['FT NTP + marginalization (exact, all V)',
                              'FT NTP + marginalization (top_k=5)',
                              'FT NTP + marginalization (top_k=1)']
    assert strategies[3:] == list(study.STRATEGIES) + ['MTP from scratch (same total iters)']
    for row in cell['table']:
        for col in ('next_top5', 'second_top5', 'next_top1', 'second_top1'):
            assert 0.0 <= row[col] <= 1.0 and row[col + '_spread'] >= 0.0
        assert row['next_top1'] <= row['next_top5'] and row['second_top1'] <= row['second_top5']
    for row in cell['table'][3:]:  # every MTP model decodes; greedy speculative == vanilla
        assert 1.0 <= row['tau'] <= cfg.n_future and row['speedup'] > 0 and row['identical']
    assert [s['attach_layer'] for s in cell['sweep']] == [0, 1]
    # the markdown table: one line per strategy, 7 columns
    table_lines = [l for l in text.splitlines() if l.startswith('| ') and 'strategy' not in l]
    assert len(table_lines) == len(strategies)
    assert all(l.count('|') == 8 for l in table_lines)
    assert os.path.isfile(tmp_path / 'study' / 'study_full.json')


# (study.py's arguments, a fragment of the one-line message)
STUDY_ERRORS = [
    (['--nope=1'], 'unknown option'),
    (['--seeds=two'], 'expects int'),
]


@pytest.mark.parametrize('args,fragment', STUDY_ERRORS, ids=[' '.join(a) for a, _ in STUDY_ERRORS])
def test_bad_flags_are_one_line_user_errors(args, fragment):
    one_line_error(study.main, args, match=fragment)
