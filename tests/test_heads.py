"""Specification of the multi-token prediction heads (heads.py): targets, loss and accuracy
counting, adapting a next-token model, 1-based head numbering, the memory-efficient backward.
(The training strategies for adapted models are specified in test_train.py.)"""
import copy
import math

import pytest
import torch

import model as M
from drafters import DraftVocab, heads_drafter
from heads import MTPGPT, MTPConfig, head_targets, mtp_loss, loss_weights_for
from conftest import tiny_config, tiny_gpt, tiny_mtp, run_train

TOL = 1e-5


def batch(T_=12, B=2, vocab=40, seed=1):
    """Inputs x_0..x_{T-1} and next-token targets y[t] = x_{t+1}."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(vocab, (B, T_ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:], seq


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# targets, loss, accuracy counting

def test_head_targets_align_head_i_with_x_t_plus_i():
    """head_targets(y, i)[t] = x_{t+i} where it exists (y[t] = x_{t+1}); the last i-1
    positions have no target (-1) -- nothing wraps around."""
    seq = torch.tensor([[10, 11, 12, 13, 14, 15, 16],
                        [20, 21, 22, 23, 24, 25, 26]])
    y = seq[:, 1:]          # x_0..x_5 as inputs, targets x_1..x_6
    Tn = y.size(1)
    for i in range(1, 5):
        t_i = head_targets(y, i)
        assert t_i.shape == y.shape
        for t in range(Tn):
            if t + i <= Tn:
                assert (t_i[:, t] == seq[:, t + i]).all(), (i, t)
            else:
                assert (t_i[:, t] == -1).all(), (i, t)
        assert int((t_i == -1).sum()) == 2 * (i - 1)
    assert head_targets(y, 3)[0].tolist() == [13, 14, 15, 16, -1, -1]


def test_mtp_loss_equals_hand_computation():
    """mtp_loss = sum_i lambda_i * mean over valid t of -log softmax(logits_i[t])[x_{t+i}],
    and ignored (-1) positions in the given targets are skipped too."""
    torch.manual_seed(0)
    B, Tn, n, V = 2, 7, 3, 11
    logits = torch.randn(B, Tn, n, V)
    _, y, seq = batch(Tn, B, V)
    y = y.clone()
    y[1, 2] = -1            # an unknown target: skipped by every head that would use it
    weights = [1.0, 0.5, 0.25]
    expected = 0.0
    for i in range(1, n + 1):
        terms = []
        for b in range(B):
            for t in range(Tn):
                if t + i - 1 < Tn and y[b, t + i - 1] >= 0:
                    target = int(y[b, t + i - 1])
                    terms.append(-torch.log_softmax(logits[b, t, i - 1], -1)[target])
        expected += weights[i - 1] * torch.stack(terms).mean()
    assert mtp_loss(logits, y, weights).item() == pytest.approx(expected.item(), abs=1e-6)
    # default weights are all 1
    unweighted = mtp_loss(logits, y)
    assert unweighted.item() != pytest.approx(expected.item(), abs=1e-3)


def test_loss_weights_for():
    assert loss_weights_for(3) == [1.0, 1.0, 1.0]
    assert loss_weights_for(4, None, 0.5, 0.5) == [1.0, 0.5, 0.25, 0.125]
    assert loss_weights_for(2, [1, 0.3]) == [1, 0.3]
    with pytest.raises(M.UserError, match='3 heads'):
        loss_weights_for(3, [1.0, 1.0])
    for bad in ([0.0, 0.0], [1.0, -0.5]):
        with pytest.raises(M.UserError, match='>= 0 and not all 0'):
            loss_weights_for(2, bad)


def test_a_head_with_zero_loss_weight_adds_nothing_to_loss_or_gradient():
    """lambda_i = 0 leaves head i out of the loss: its parameters get no (or zero) gradient, in
    the standard and in the head-by-head backward (train.py then freezes such heads)."""
    for head_by_head in (False, True):
        model = tiny_mtp(n_future=3)
        x, y, _ = batch()
        if head_by_head:
            model.backward_head_by_head(x, y, [0.0, 1.0, 1.0])
        else:
            model(x, y, loss_weights=[0.0, 1.0, 1.0])[1].backward()
        assert all(p.grad is None or not p.grad.any() for p in model.heads.head_parameters(1))
        assert all(p.grad is not None and p.grad.any() for p in model.heads.head_parameters(2))


# heads are numbered from 1: head k predicts x_{t+k}

def head_logits(model, k, trunk_hidden, idx=None):
    """Head k's logits from head_states (one head at a time, as train.evaluate reads them)."""
    return model.unembed(list(model.head_states(idx, trunk_hidden, n_heads=k))[-1][1])


@pytest.mark.parametrize('head_type', ['block', 'resblock', 'sequential'])
def test_head_states_k_is_head_k_of_the_forward_1_based(head_type, arch):
    """head_states yields (k, s_k) for k = 1, 2, ...: 1-based as in the paper's x_{t+k}: head 1
    is the next-token head, logits[:, :, 0] of forward(), and head k is logits[:, :, k-1], for
    every k = 1..n_future."""
    model = tiny_mtp(n_future=3, head_type=head_type, arch=arch)
    torch.manual_seed(2)
    with torch.no_grad():  # (resblock heads start as the identity: make them differ)
        for p in model.heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, _, _ = batch()
    with torch.no_grad():
        logits, _ = model(x)
        trunk_hidden = model.trunk(x)
        for k in range(1, 4):
            assert max_diff(head_logits(model, k, trunk_hidden, x), logits[:, :, k - 1]) <= TOL, k
        ntp, _ = model(x, n_heads=1)  # the next-token path alone is head 1
        assert max_diff(head_logits(model, 1, trunk_hidden), ntp[:, :, 0]) <= TOL
    # the heads are different functions, so a shifted numbering would fail above
    assert max_diff(logits[:, :, 0], logits[:, :, 1]) > 1e-3
    assert max_diff(logits[:, :, 1], logits[:, :, 2]) > 1e-3


def test_the_default_config_is_the_main_jobs_heads_and_an_unknown_design_is_an_error():
    """MTPConfig(n_future=4) builds the main job's heads: sequential, with an MLP body."""
    config = MTPConfig(**tiny_config().__dict__, n_future=4)
    assert (config.head_type, config.head_attention, config.attach_layer) == ('sequential',
                                                                             False, 3)
    for bad in ('mlp', 'linear'):
        with pytest.raises(M.UserError, match='head_type'):
            MTPConfig(**tiny_config().__dict__, n_future=3, head_type=bad)


# -----------------------------------------------------------------------------
# adapting a next-token model

def assert_every_head_reproduces(src, mtp):
    """Every head of mtp gives the logits of the source model (1e-5)."""
    x, _, _ = batch()
    with torch.no_grad():
        ref, _ = src(x)
        out, _ = mtp(x)
    for i in range(mtp.config.n_future):
        assert max_diff(out[:, :, i], ref) <= TOL


@pytest.mark.parametrize('attach', [0, 1, 2])
def test_from_gpt_head1_reproduces_the_source_at_every_attach_layer(attach, arch):
    """MTPGPT.from_gpt(ntp, n_future=3, attach_layer=a), block heads: head 1 gives the source
    model's logits for every a in 0..n_layer-1 (and at init the other heads are copies of it)."""
    src = tiny_gpt(n_layer=3, arch=arch)
    mtp = MTPGPT.from_gpt(src, n_future=3, attach_layer=attach, head_type='block').eval()
    assert len(mtp.transformer.h) == attach
    assert all(len(h.blocks) == 3 - attach for h in mtp.heads)
    assert_every_head_reproduces(src, mtp)


def test_from_gpt_of_an_mtp_model_uses_its_head1_path(arch):
    """Adapting an MTPGPT re-uses trunk + head 1 (its next-token path)."""
    src = tiny_mtp(n_future=2, arch=arch).eval()
    mtp = MTPGPT.from_gpt(src, n_future=4, attach_layer=0, head_type='block').eval()
    x, _, _ = batch()
    with torch.no_grad():
        ref, _ = src(x, n_heads=1)
        out, _ = mtp(x)
    assert max_diff(out[:, :, 0], ref[:, :, 0]) <= TOL
    whs = MTPGPT.from_gpt(src, n_future=2, whs=True, head_type='block')
    with pytest.raises(M.UserError, match='head 1'):
        MTPGPT.from_gpt(whs, n_future=2, head_type='block')


def test_one_head_mtp_model_is_the_plain_gpt(arch):
    """n_future=1: the same parameter count as model.GPT and, with identical weights, the same
    logits and loss."""
    cfg = tiny_config(arch)
    assert MTPGPT(MTPConfig(**cfg.__dict__, n_future=1)).num_params() == M.GPT(cfg).num_params()
    src = tiny_gpt(arch=arch)
    mtp = MTPGPT.from_gpt(src, n_future=1).eval()
    assert mtp.num_params() == src.num_params()
    assert mtp.num_params(non_embedding=False) == src.num_params(non_embedding=False)
    x, y, _ = batch()
    with torch.no_grad():
        ref_logits, ref_loss = src(x, y)
        logits, loss = mtp(x, y)
    assert max_diff(logits[:, :, 0], ref_logits) <= TOL
    assert loss.item() == pytest.approx(ref_loss.item(), abs=TOL)


def test_whs_at_init_equals_plain_heads_and_every_layer_gets_a_gradient(arch):
    """WHS starts as 'read the last trunk layer' (whs_weights() is one-hot on h_attach for every
    head): its logits equal those of the same model without WHS; after a backward every head's
    coefficient of EVERY layer has a gradient of order one (not ~e^-12, as a saturated softmax's)."""
    src = tiny_gpt(arch=arch)
    plain = MTPGPT.from_gpt(src, n_future=3, attach_layer=1, head_type='block').eval()
    whs = MTPGPT.from_gpt(src, n_future=3, attach_layer=1, whs=True,
                          head_type='block').eval()
    # perturb head 2 and 3 identically in both so the heads differ from each other
    torch.manual_seed(5)
    for hp, hw in zip(list(plain.heads)[1:], list(whs.heads)[1:]):
        for p, q in zip(hp.blocks.parameters(), hw.blocks.parameters()):
            noise = 0.02 * torch.randn_like(p)
            with torch.no_grad():
                p.add_(noise)
                q.add_(noise)
    x, y, _ = batch()
    with torch.no_grad():
        a, _ = plain(x)
        b, _ = whs(x)
    assert max_diff(a, b) <= TOL
    whs.train()
    _, loss = whs(x, y)
    loss.backward()
    assert torch.equal(whs.whs_weights(), torch.tensor([[0., 1.]] * 3))
    assert plain.whs_weights() is None
    for head in whs.heads:
        assert (head.whs_coef.grad.abs() > 1e-4).all(), head.whs_coef.grad


def test_resblock_heads_start_as_the_plain_model(arch):
    """Medusa (resblock) heads are the identity at init: every head's logits equal the source
    model's."""
    src = tiny_gpt(arch=arch)
    mtp = MTPGPT.from_gpt(src, n_future=3, head_type='resblock').eval()
    assert mtp.config.attach_layer == 3 and len(mtp.transformer.h) == 3
    assert_every_head_reproduces(src, mtp)


@pytest.mark.parametrize('kw', [dict(), dict(whs=True), dict(bias=True)])
def test_resblock_drafts_at_one_position_equal_each_heads_logits(kw):
    """The resblock drafter (heads 2..n at the last verified position, as one batched matmul)
    gives head k's logits there, with WHS mixes and biases too."""
    model = tiny_mtp(n_future=4, head_type='resblock', **kw)
    x = batch()[0][1:]
    with torch.no_grad():
        for p in model.heads.parameters():  # not the identity / last-layer init
            p.normal_(0, 0.5)
        trunk_hidden = model.trunk(x[:, :6])
        want = torch.stack([head_logits(model, k, trunk_hidden)[0, 5] for k in range(2, 5)])
        propose = DraftVocab(model, lambda logits: (logits.argmax(-1), logits))  # q: the logits
        drafter = heads_drafter(model, propose)
        drafter.observe(x[0, :7].tolist(), trunk_hidden, 0)
        got = drafter.draft(x[0].tolist(), 3)[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the memory-efficient backward

@pytest.mark.parametrize('kw', [dict(), dict(whs=True), dict(attach_layer=0, whs=True),
                                dict(head_type='resblock', attach_layer=3),
                                dict(head_type='sequential'),
                                dict(head_type='sequential', whs=True),
                                dict(head_type='sequential', head_attention=False)],
                         ids=['block', 'whs', 'whs-attach0', 'resblock', 'sequential',
                              'sequential-whs', 'sequential-mlp'])
def test_head_by_head_backward_gives_the_same_gradients(kw, arch):
    """backward_head_by_head (one head's forward+backward at a time) gives the gradients
    of mtp_loss(...).backward() for every parameter, and the same loss value."""
    a = tiny_mtp(n_future=3, arch=arch, **kw).train()
    torch.manual_seed(3)
    with torch.no_grad():  # move away from init so every path carries gradient
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = copy.deepcopy(a)
    x, y, _ = batch(T_=10, B=3)
    weights = [1.0, 0.6, 0.3]
    _, loss = a(x, y, loss_weights=weights)
    loss.backward()
    total = b.backward_head_by_head(x, y, loss_weights=weights)
    assert float(total) == pytest.approx(loss.item(), abs=TOL)
    named_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        q = named_b[name]
        assert p.grad is not None and q.grad is not None, name
        assert max_diff(p.grad, q.grad) <= TOL, name


# -----------------------------------------------------------------------------
# it learns to look two tokens ahead

def test_head2_learns_the_token_after_next(corpus, tmp_path):
    """On a corpus of random 8-letter words (x_{t+2} is determined by x_t inside a word), a
    short n_future=2 run lifts head 2's top-1 val accuracy far above chance (1/32)."""
    s = run_train(corpus, tmp_path / 'out', '--n_future=2', '--max_iters=80',
                  '--eval_interval=80', '--eval_iters=4', '--batch_size=16')
    head2 = s['val_heads'][1]
    assert head2['head'] == 2
    assert head2['top1'] > 0.5      # chance is 1/32
    assert head2['top5'] > 0.9
    assert head2['loss'] < math.log(32) - 1.5


def test_sequential_head_k_reads_x_t_plus_k_minus_1_and_nothing_later():
    """Sequential head k at t reads x_<=t (through s_1) and x_{t+1}..x_{t+k-1} (through the
    chain, teacher-forced): changing x_{t+k-1} changes its logits at t; changing any later token
    does not (causality: no head sees its own target)."""
    model = tiny_mtp(n_future=3, head_type='sequential')
    x, _, _ = batch(T_=12, B=1)
    t = 5
    with torch.no_grad():
        base, _ = model(x)
        for k in (2, 3):
            for j, changes in ((t + k - 1, True), (t + k, False), (11, False)):
                x2 = x.clone()
                x2[0, j] = (x2[0, j] + 1) % 40
                out, _ = model(x2)
                assert (max_diff(out[:, t, k - 1], base[:, t, k - 1]) > 1e-4) == changes, (k, j)


@pytest.mark.parametrize('whs', [False, True])
def test_from_gpt_with_sequential_heads_keeps_the_source_as_head_1(whs):
    """Sequential head 1 is the trunk itself: an adapted model's next-token logits are the
    source's, heads 2..n are new modules, and with WHS only head 2 (the chain's entry) mixes."""
    src = tiny_gpt()
    mtp = MTPGPT.from_gpt(src, n_future=3, head_type='sequential', whs=whs,
                          head_attention=True).eval()
    x, _, _ = batch()
    with torch.no_grad():
        assert max_diff(mtp(x)[0][:, :, 0], src(x)[0]) <= TOL
    assert len(mtp.transformer.h) == 3 and len(mtp.heads) == 2
    assert mtp.heads.head_parameters(1) == []
    assert mtp.whs_weights() is None if not whs else mtp.whs_weights().shape == (1, 4)


def test_one_head_is_the_plain_gpt_whatever_the_head_type():
    """n_future=1 has no extra heads: head_type='resblock' still builds the plain block stack."""
    config = MTPConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8, n_future=1,
                       head_type='resblock')
    assert config.head_type == 'block' and config.attach_layer == 1
    model = MTPGPT(config)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in M.GPT(M.GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16,
                                             block_size=8)).parameters())


def test_flops_per_token_counts_parameters_every_heads_unembedding_and_attention():
    """By hand, for 2 layers of 16 channels, vocab 10, 8 positions, 3 sequential MLP heads:
    6 FLOPs per parameter, the tied unembedding once more for heads 2 and 3, and 12 L C T for
    the attention scores (only the trunk's 2 layers attend)."""
    model = MTPGPT(MTPConfig(vocab_size=10, n_layer=2, n_head=2, n_embd=16, block_size=8,
                             n_future=3, head_type='sequential'))
    params = sum(p.numel() for p in model.parameters()) - 8 * 16  # (no position embeddings)
    assert model.flops_per_token(8) == 6 * (params + 2 * 10 * 16) + 12 * 2 * 16 * 8

