"""Specification of the layer probes (probes.py): the logit lens and linear probes of every layer
of a next-token model, for x_{t+1} and x_{t+2}."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import probes
from common import load_model, save_checkpoint
from marginalize import evaluate_table
from conftest import tiny_mtp, pattern_text, make_corpus, one_line_error


@pytest.fixture(scope='module')
def word_tokens(tmp_path_factory):
    """Train and val tokens of the 8-letter-word corpus: inside a word x_t determines x_{t+2}."""
    data_dir = make_corpus(tmp_path_factory.mktemp('words'), pattern_text(4000))
    return [np.memmap(f"{data_dir}/{split}.bin", dtype=np.uint16, mode='r')
            for split in ('train', 'val')]


def test_states_are_every_layer_of_the_next_token_path_with_both_targets(word_tokens):
    """layer_states gives h_0 (embeddings) .. h_L (the last block's output, head 1's block
    included) at each position, and the targets x_{t+1}, x_{t+2} of those positions."""
    model = tiny_mtp(n_future=1, vocab_size=32)
    states, targets = probes.layer_states(model, word_tokens[1], 50)
    assert states.shape == (model.config.n_layer + 1, 50, model.config.n_embd)
    assert targets.shape == (50, 2)
    tokens = torch.as_tensor(word_tokens[1].astype(np.int64))
    start, n = probes.eval_windows(len(word_tokens[1]), model.config.block_size, 2, 50)[0]
    t = torch.arange(start, start + n)  # the first window's positions: targets x_{t+1}, x_{t+2}
    assert torch.equal(targets[:n, 0], tokens[t + 1]) and torch.equal(targets[:n, 1], tokens[t + 2])
    seq = torch.as_tensor(word_tokens[1][:model.config.block_size].astype(np.int64))
    with torch.no_grad():
        logits = model(seq[None])[0][0, :, 0]
        lens = model.unembed(states[-1])
    windows = probes.eval_windows(len(word_tokens[1]), model.config.block_size, 2, 50)
    start, n = windows[0]
    window_logits = model(torch.as_tensor(word_tokens[1][start:start + n + 2].astype(np.int64))
                          [None])[0][0, :n, 0]
    assert torch.allclose(lens[:n], window_logits, atol=1e-5)
    assert logits.shape[-1] == 32


def test_logit_lens_at_the_last_layer_is_the_models_own_next_token_accuracy(word_tokens):
    """At l = L the lens is the model's readout: its x_{t+1} accuracy equals the accuracy table's
    next-token row on the same positions, exactly."""
    model = tiny_mtp(n_future=1, vocab_size=32)
    result = probes.layer_probes(model, word_tokens[0], word_tokens[1], train_positions=200,
                                 val_positions=120, steps=5)
    table = evaluate_table(model, word_tokens[1], positions=120, k_ahead=2, top_ks=[1])[0]
    assert result['positions'] == table['n'][0] == 120
    assert result['lens']['top1'][0][-1] == table['top1'][0]
    assert result['lens']['top5'][0][-1] == table['top5'][0]


def test_a_linear_probe_reads_the_token_after_next_from_the_embeddings(word_tokens):
    """On the word corpus x_{t+2} is a function of x_t inside a word (6 of 8 positions; 1 in 4
    across a boundary), so a linear probe of h_0 -- even of an untrained model, whose random
    embeddings are linearly independent -- reaches a top-1 far above chance (1/32), while the
    untrained model's own readout (the lens) does not."""
    model = tiny_mtp(n_future=1, vocab_size=32)
    result = probes.layer_probes(model, word_tokens[0], word_tokens[1], train_positions=2000,
                                 val_positions=500, steps=300, lr=3e-2)
    assert result['probe']['top1'][1][0] > 0.6
    assert result['lens']['top1'][1][0] < 0.2
    for readout in ('lens', 'probe'):
        for k in (0, 1):
            assert all(t1 <= t5 for t1, t5 in zip(result[readout]['top1'][k],
                                                  result[readout]['top5'][k]))


def test_cli_prints_both_tables_and_a_json_line_last(corpus, ntp_ckpt, capsys):
    result = probes.main([f'--ckpt={ntp_ckpt}', '--train_positions=100', '--val_positions=50',
                          '--steps=3', '--device=cpu'])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith('lens') and any(line.startswith('probe') for line in out)
    summary = json.loads(out[-1])
    assert summary['layers'] == result['layers'] == [0, 1, 2]
    assert summary['data_dir'] == corpus
    assert load_model(ntp_ckpt)[0].config.n_future == 1


PROBE_ERRORS = [
    (['--steps=0'], 'steps must be >= 1'),
    (['--ckpt=missing.pt'], 'checkpoint not found'),
    (['--nope=1'], 'unknown option'),
    (['--lr=nan'], '--lr must be a number > 0, got nan'),
    (['--lr=-1'], '--lr must be a number > 0'),
]


@pytest.mark.parametrize('args,fragment', PROBE_ERRORS, ids=[' '.join(a) for a, _ in PROBE_ERRORS])
def test_bad_flags_are_one_line_user_errors(args, fragment):
    one_line_error(probes.main, args, match=fragment)


def test_data_dir_without_token_files_is_a_one_line_error(ntp_ckpt, tmp_path):
    one_line_error(probes.main, [f'--ckpt={ntp_ckpt}', f'--data_dir={tmp_path}'],
                   match='token file not found')


def test_a_resblock_checkpoint_is_named_as_what_probes_cannot_read(counting_ckpt, tmp_path):
    """Probes read the next-token path's blocks; a ResBlock checkpoint has none to read."""
    model = tiny_mtp(n_future=2, head_type='resblock')
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config)),
                    str(tmp_path / 'rb.pt'))
    one_line_error(probes.main, [f"--ckpt={tmp_path / 'rb.pt'}"], match=('ResBlock', 'NTP'))
