"""Specification of distill.py (self-distillation of the MTP heads) and the train.py pieces it
uses: fine-tuning an MTP checkpoint whole, and lambda_1 = 0 leaving head 1 untouched."""
import json
import os
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

import distill
import train as T
from common import UserError, load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from data.prepare import Batches
from data.text import val_path
from conftest import fails_on_a_full_disk, one_line_error, run_train, train_config
from sample import generate, generate_self_speculative
from report import evaluate


@pytest.fixture(scope='module')
def mtp_ckpt(corpus, tmp_path_factory):
    """A briefly trained 3-head checkpoint (block heads) on the random-words corpus."""
    out = tmp_path_factory.mktemp('mtp')
    run_train(corpus, out, '--n_future=3', '--max_iters=60', '--eval_interval=60')
    return os.path.join(str(out), 'ckpt.pt')


def test_init_from_an_mtp_checkpoint_fine_tunes_it_whole(corpus, mtp_ckpt, tmp_path):
    """A checkpoint with heads is loaded as it is (every head included), not re-adapted."""
    cfg = train_config(corpus, tmp_path, f'--init_from={mtp_ckpt}', '--n_future=2')
    model = T.build_model(cfg, {"vocab_size": 32})
    source = load_checkpoint(mtp_ckpt)['model']
    state = model.state_dict()
    assert model.config.n_future == 3 and state.keys() == source.keys()
    assert all(torch.equal(state[k], source[k]) for k in source)
    cfg = train_config(corpus, tmp_path, f'--init_from={mtp_ckpt}', '--n_future=1',
                       '--block_size=3')
    with pytest.raises(UserError, match='leaves head 3 no target'):   # its heads, not the flag's
        T.build_model(cfg, {'vocab_size': 32})


def test_another_head_type_adapts_the_next_token_path_of_an_mtp_checkpoint(corpus, mtp_ckpt,
                                                                          tmp_path):
    """--head_type other than the checkpoint's: its next-token path (trunk + head 1) gets new
    heads, as an NTP model would (so head types can be compared on one next-token model); the
    checkpoint's own type is fine-tuned whole, as distill.py does for any head type."""
    source = model_from_checkpoint(load_checkpoint(mtp_ckpt)).eval()
    cfg = train_config(corpus, tmp_path, f'--init_from={mtp_ckpt}', '--head_type=sequential',
                       '--head_attention=true', '--n_future=4')
    model = T.build_model(cfg, {"vocab_size": 32})
    assert (model.config.head_type, model.config.n_future) == ('sequential', 4)
    x = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, n_heads=1)[0], source(x, n_heads=1)[0], atol=1e-5)
    args = distill.DistillConfig(ckpt=mtp_ckpt, out_dir=str(tmp_path))
    assert distill.fine_tuning_config(args, model.config).head_type == 'sequential'
    # sequential heads with another body (--head_attention) are another head type too
    seq_ckpt = str(tmp_path / 'seq.pt')
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                         meta=load_checkpoint(mtp_ckpt)['meta'], config={}), seq_ckpt)
    for attention, kept in ((True, True), (False, False)):
        cfg = train_config(corpus, tmp_path, f'--init_from={seq_ckpt}', '--head_type=sequential',
                           f'--head_attention={attention}', '--n_future=4')
        again = T.build_model(cfg, {"vocab_size": 32})
        assert again.config.head_attention == attention
        assert all(torch.equal(again.state_dict()[k], v)
                   for k, v in model.state_dict().items()) == kept


def test_zero_weight_for_head1_with_frozen_trunk_trains_only_the_other_heads(corpus, mtp_ckpt,
                                                                             tmp_path):
    src = load_checkpoint(mtp_ckpt)['model']
    run_train(corpus, tmp_path, f'--init_from={mtp_ckpt}', '--freeze_trunk=true',
              '--loss_weights=0,1,1', '--max_iters=5', '--eval_interval=5')
    state = load_checkpoint(str(tmp_path / 'ckpt.pt'))['model']
    untouched = [k for k in src if not k.startswith(('heads.1.', 'heads.2.'))]
    assert any(k.startswith('heads.0.') for k in untouched)
    for k in untouched:   # trunk, shared unembedding and head 1: bit-identical
        assert torch.equal(state[k], src[k]), k
    for i in (1, 2):
        assert not torch.equal(state[f'heads.{i}.blocks.0.mlp.c_fc.weight'],
                               src[f'heads.{i}.blocks.0.mlp.c_fc.weight'])


def test_document_batches_start_at_documents_and_skip_prompt_targets(tmp_path):
    """doc_len=6, doc_prompt=2: windows are whole documents; the targets that are prompt tokens
    or lie past the document's end are -1."""
    docs = np.arange(30, dtype=np.uint16)   # 5 documents: 0..5, 6..11, ...
    docs.tofile(tmp_path / 'docs.bin')
    batches = Batches(str(tmp_path / 'docs.bin'), 6, 64, 'cpu', 0, doc_len=6, doc_prompt=2)
    x, y = batches.next()
    starts = x[:, 0]
    assert set(starts.tolist()) == {0, 6, 12, 18, 24}   # the last document too
    assert torch.equal(x, starts[:, None] + torch.arange(6))
    want = starts[:, None] + torch.arange(1, 7)
    want[:, :1] = -1    # y[0] = token 1: a prompt token
    want[:, 5:] = -1    # y[5] = token 6: the next document
    assert torch.equal(y, want)
    with pytest.raises(UserError, match='not a run of documents'):
        Batches(str(tmp_path / 'docs.bin'), 6, 4, 'cpu', 0, doc_len=7)


def agreement_with_greedy(model, data_dir, seed=0):
    """Per head, top-1 agreement with the distilled validation corpus (the model's own greedy
    continuations)."""
    batches = Batches(os.path.join(data_dir, 'val.bin'), 16, 8, 'cpu', seed, doc_len=16,
                      doc_prompt=4)
    return [h['top1'] for h in evaluate(model, batches, 8, torch.autocast('cpu', enabled=False)
                                        )['heads']]


def test_distill_writes_the_models_own_greedy_text_and_its_heads_learn_it(corpus, mtp_ckpt,
                                                                           tmp_path, capsys):
    out = tmp_path / 'distilled'
    distill.main([f'--ckpt={mtp_ckpt}', f'--out_dir={out}', '--num_sequences=96',
                  '--val_sequences=16', '--prompt_len=4', '--seq_len=16', '--gen_batch=32',
                  '--max_iters=150', '--batch_size=16', '--learning_rate=1e-2',
                  '--eval_interval=150', '--eval_iters=4', '--quiet=true', '--device=cpu',
                  '--dtype=float32'])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary['loss_weights'] == '0,1,1' and summary['iters'] == 150

    # the corpus: 16-token sequences, each a 4-token prompt continued greedily by the model
    source, _ = load_model(mtp_ckpt)
    data = out / 'data'
    val = np.fromfile(data / 'val.bin', dtype=np.uint16).astype(np.int64).reshape(16, 16)
    assert len(np.fromfile(data / 'train.bin', dtype=np.uint16)) == 96 * 16
    for row in val[:4].tolist():
        assert row[4:] == generate(source, row[:4], 12, temperature=0).tokens
    assert json.loads((data / 'meta.json').read_text())['vocab_size'] == 32

    # the distilled model: the same next-token model; heads 2..n agree more with its greedy text
    distilled, distilled_ckpt = load_model(str(out / 'ckpt.pt'))
    # prompts and evaluations of the distilled checkpoint still come from the real text
    assert val_path(distilled_ckpt) == os.path.join(corpus, 'val.bin')
    x = torch.tensor(val[:, :12])
    with torch.no_grad():
        torch.testing.assert_close(distilled(x, n_heads=1)[0], source(x, n_heads=1)[0],
                                   atol=0, rtol=0)
    before, after = agreement_with_greedy(source, data), agreement_with_greedy(distilled, data)
    assert after[0] == before[0] > 0.99   # the corpus is head 1's own greedy text
    assert after[1] > before[1] + 0.05 and after[2] > before[2] + 0.05, (before, after)
    assert min(after) > 0.95, after
    prompt = val[0, :4].tolist()
    assert (generate_self_speculative(distilled, prompt, 30, temperature=0).tokens
            == generate(source, prompt, 30, temperature=0).tokens)


# (distill.py's arguments after --out_dir=<the test's out> and before --device, a fragment of
# the message); {mtp}: a 3-head checkpoint, {ntp}: a next-token one (no heads), {tmp}: the
# test's directory
DISTILL_ERRORS = [
    (['--ckpt={ntp}'], 'no MTP heads'),
    (['--ckpt={mtp}', '--seq_len=4', '--prompt_len=4'], 'must exceed prompt_len'),
    (['--ckpt={mtp}', '--gen_batch=0'], 'gen_batch'),
    (['--ckpt={mtp}', '--seq_len=17', '--prompt_len=4'], 'must be in 4..16'),
    (['--ckpt={mtp}', '--seq_len=3', '--prompt_len=1'], 'must be in 4..16'),
    (['--ckpt={mtp}', '--seq_len=16', '--prompt_len=4', '--loss_weights=1,1,1'],
     'must start with 0'),
    (['--ckpt={mtp}', '--seq_len=16', '--prompt_len=4', '--loss_weights=0,1'],
     '2 values for 3 heads'),
    (['--ckpt={mtp}', '--seq_len=16', '--prompt_len=4', '--eval_iters=0'], 'eval_iters'),
    # the model's shape and what is frozen are not flags here
    (['--ckpt={mtp}', '--n_future=5'], 'unknown option'),
    (['--ckpt={mtp}', '--freeze_trunk=false'], 'unknown option'),
    (['--ckpt={mtp}', '--init_from=scratch'], 'unknown option'),
    (['--ckpt={tmp}/missing.pt'], 'not found'),
    # its own output would overwrite the source checkpoint ({copy}: a copy of {mtp}'s directory)
    (['--ckpt={copy}/ckpt.pt', '--out_dir={copy}', '--seq_len=16', '--prompt_len=4'],
     'holds the source checkpoint'),
]


@pytest.mark.parametrize('args,fragment', DISTILL_ERRORS,
                         ids=[' '.join(a) for a, _ in DISTILL_ERRORS])
def test_distill_user_errors(mtp_ckpt, ntp_ckpt, tmp_path, args, fragment):
    """Every flag is checked before minutes of generation: a bad one is a one-line UserError
    and nothing is generated."""
    shutil.copytree(os.path.dirname(mtp_ckpt), tmp_path / 'copy')
    args = [a.format(mtp=mtp_ckpt, ntp=ntp_ckpt, tmp=tmp_path, copy=tmp_path / 'copy')
            for a in args]
    one_line_error(distill.main, [f'--out_dir={tmp_path / "out"}', *args, '--device=cpu'],
                   match=fragment)
    for out in ('out', 'copy'):  # refused before generating
        assert not (tmp_path / out / 'data' / 'train.bin').exists()
    assert open(tmp_path / 'copy' / 'ckpt.pt', 'rb').read() == open(mtp_ckpt, 'rb').read()


def test_a_corpus_that_cannot_be_written_is_one_line_and_leaves_no_files(mtp_ckpt, tmp_path):
    """Under a file-size limit (a full disk, in a forked child: RLIMIT_FSIZE) writing the corpus
    fails with a one-line error, and no temporary or partial file is left in its data dir."""
    out = tmp_path / 'distilled'
    assert fails_on_a_full_disk(lambda: distill.main([
        f'--ckpt={mtp_ckpt}', f'--out_dir={out}', '--num_sequences=96', '--val_sequences=16',
        '--prompt_len=4', '--seq_len=16', '--quiet=true', '--device=cpu']), lambda error: (
            isinstance(error, UserError) and 'cannot write the corpus' in str(error)), limit=1000)
    assert [path for path in out.rglob('*') if path.is_file()] == []  # (out_dir: nothing)


def test_distill_never_writes_over_the_data_its_checkpoint_reads(corpus, tmp_path):
    """A model trained on ws/data, distilled with --out_dir=ws, would write its corpus over the
    user's dataset (ws/data): a one-line error, and the dataset is untouched."""
    shutil.copytree(corpus, tmp_path / 'ws' / 'data')
    run_train(str(tmp_path / 'ws' / 'data'), tmp_path / 'run', '--n_future=3', '--max_iters=2',
              '--eval_interval=2')
    before = {p.name: p.read_bytes() for p in (tmp_path / 'ws' / 'data').iterdir()}
    one_line_error(distill.main, [f"--ckpt={tmp_path / 'run' / 'ckpt.pt'}",
                                  f"--out_dir={tmp_path / 'ws'}", '--seq_len=16',
                                  '--prompt_len=4', '--device=cpu'],
                   match=('would write the corpus over', 'pick another --out_dir'))
    assert {p.name: p.read_bytes() for p in (tmp_path / 'ws' / 'data').iterdir()} == before
