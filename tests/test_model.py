"""Specification of the GPT backbone (model.py): exact KV cache, hidden states, masks and
optimizer groups. (Checkpoint files are specified in test_common.py.)"""
import pytest
import torch

import model as M
from conftest import tiny_gpt, tiny_mtp

TOL = 1e-5


def tokens(T, vocab=40, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (B, T), generator=g)


def decode_in_pieces(model, idx, sizes):
    """Feed idx through one KVCache in consecutive pieces of the given sizes; concat logits."""
    cache = model.new_cache()
    out, start = [], 0
    for n in sizes:
        logits, _ = model(idx[:, start:start + n], cache=cache)
        out.append(logits)
        start += n
    assert start == idx.size(1) and cache.length == idx.size(1)
    return torch.cat(out, dim=1)


PIECES = {
    'one token at a time': [1] * 24,
    'chunks of 3': [3] * 8,
    'prefill then chunks and single tokens': [7, 3, 3, 1, 1, 3, 2, 4],
}


# -----------------------------------------------------------------------------
# KV cache: incremental decoding is exact

@pytest.mark.parametrize('pieces', list(PIECES.values()), ids=list(PIECES))
def test_gpt_incremental_decoding_matches_full_forward(pieces, arch):
    """Appending tokens through the KV cache (singly, in chunks, or mixed) gives the same
    logits as one full forward over the whole sequence (GPT-NeoX: rotary positions continue
    from the cache's length)."""
    model = tiny_gpt(arch=arch)
    idx = tokens(24)
    with torch.no_grad():
        full, _ = model(idx)
        inc = decode_in_pieces(model, idx, pieces)
    assert inc.shape == full.shape
    assert (inc - full).abs().max().item() <= TOL


@pytest.mark.parametrize('pieces', list(PIECES.values()), ids=list(PIECES))
def test_mtp_incremental_decoding_matches_full_forward_for_every_head(pieces, arch):
    """Same for an MTPGPT with 3 heads: every head's logits through the cache equal the full
    forward's (each head owns its own cache layers)."""
    model = tiny_mtp(n_future=3, arch=arch)
    idx = tokens(24)
    with torch.no_grad():
        full, _ = model(idx)
        inc = decode_in_pieces(model, idx, pieces)
    assert full.shape == (2, 24, 3, 40)
    assert inc.shape == full.shape
    assert (inc - full).abs().max().item() <= TOL
    # the heads are different functions (otherwise the check above would be weak)
    assert (full[:, :, 0] - full[:, :, 1]).abs().max().item() > 1e-3


@pytest.mark.parametrize('make', [tiny_gpt, tiny_mtp], ids=['GPT', 'MTPGPT'])
def test_rollback_then_append_equals_fresh_forward(make, arch):
    """Rolling the cache back k positions and appending different tokens gives the logits of a
    fresh forward on the new sequence: rolled-back entries are forgotten and positions continue
    from the rolled-back length."""
    model = make(arch=arch)
    idx = tokens(20)
    k = 5
    new_tail = (idx[:, -k:] + 7) % 40  # differs from the tokens rolled back
    new_seq = torch.cat([idx[:, :-k], new_tail, tokens(3, seed=9)], dim=1)
    with torch.no_grad():
        cache = model.new_cache()
        model(idx, cache=cache)
        cache.rollback(20 - k)
        assert cache.length == 15
        a, _ = model(new_seq[:, 15:20], cache=cache)       # a chunk after the rollback
        b, _ = model(new_seq[:, 20:21], cache=cache)       # then single tokens
        c, _ = model(new_seq[:, 21:], cache=cache)
        assert cache.length == new_seq.size(1)
        fresh, _ = model(new_seq)
    inc = torch.cat([a, b, c], dim=1)
    assert (inc - fresh[:, 15:]).abs().max().item() <= TOL
    # and the rolled-back tokens really mattered: the old continuation differs
    with torch.no_grad():
        old, _ = model(idx)
    assert (old[:, 15:20] - fresh[:, 15:20]).abs().max().item() > 1e-3


def test_rollback_to_invalid_length_raises():
    """rollback accepts only 0 <= n <= current length."""
    model = tiny_gpt()
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(6), cache=cache)
    for bad in (-1, 7, 100):
        with pytest.raises(ValueError, match='roll back'):
            cache.rollback(bad)
    assert cache.length == 6
    cache.rollback(0)
    assert cache.length == 0


def test_sequence_longer_than_block_size_raises_clear_error():
    """More tokens than learned positions is a ValueError naming block_size, both in a plain
    forward and when the cache would run past block_size (the cache is left untouched)."""
    model = tiny_gpt(block_size=16)
    with pytest.raises(ValueError, match='block_size'):
        model(tokens(17))
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(10), cache=cache)
    with pytest.raises(ValueError, match='block_size'):
        model(tokens(7), cache=cache)
    assert cache.length == 10
    with torch.no_grad():  # still usable: exactly block_size tokens is fine
        model(tokens(6), cache=cache)
    assert cache.length == 16


def test_kv_cache_overflow_raises():
    """Writing past the cache's max_len is an error, not a silent wrap-around."""
    model = tiny_gpt()
    cache = model.new_cache(max_len=8)
    with torch.no_grad():
        model(tokens(8), cache=cache)
        with pytest.raises(ValueError, match='overflow'):
            model(tokens(1), cache=cache)


def test_rotary_positions_matter_and_explicit_positions_are_used():
    """GPT-NeoX has no position table: positions enter as rotations of q and k. Shifting every
    position by a constant changes nothing (attention sees only m - n), while giving one
    token another position changes the logits."""
    model = tiny_gpt(arch='neox')
    assert 'wpe' not in model.transformer
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied
    idx = tokens(10)
    with torch.no_grad():
        for p in model.parameters():  # large weights: attention far from uniform
            p.normal_(0, 0.3)
        ref, _ = model(idx)
        shifted, _ = model(idx, pos=torch.arange(10) + 7)
        pos = torch.arange(10)
        pos[-1] = 4
        moved, _ = model(idx, pos=pos)
    assert (shifted - ref).abs().max().item() <= 1e-4
    assert (moved[:, -1] - ref[:, -1]).abs().max().item() > 1e-3


# -----------------------------------------------------------------------------
# hidden states and unembedding

def test_hidden_states_reproduce_logits_through_unembed():
    """return_hidden gives n_layer + 1 states (embeddings .. last block) and the last one
    through model.unembed (final LayerNorm + tied unembedding) is exactly the logits."""
    model = tiny_gpt(n_layer=3)
    idx = tokens(12)
    with torch.no_grad():
        logits, _, hidden = model(idx, return_hidden=True)
        assert len(hidden) == 3 + 1
        assert all(h.shape == (2, 12, 32) for h in hidden)
        assert (model.unembed(hidden[-1]) - logits).abs().max().item() <= TOL
        emb = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(12))
        assert torch.allclose(hidden[0], emb, atol=TOL)


def test_mtp_return_hidden_gives_trunk_states():
    """For an MTPGPT, return_hidden gives the trunk states h_0 .. h_attach_layer."""
    model = tiny_mtp(n_future=2, attach_layer=1)
    with torch.no_grad():
        _, _, hidden = model(tokens(8), return_hidden=True)
    assert len(hidden) == 1 + 1


# -----------------------------------------------------------------------------
# explicit masks and positions

def test_explicit_causal_mask_and_positions_equal_default(arch):
    """Passing attn_mask = the causal mask and pos = the default positions (for a chunk after a
    cached prefix, and for a prefill) reproduces the default logits exactly."""
    model = tiny_mtp(n_future=2, arch=arch)
    idx = tokens(12)
    with torch.no_grad():
        ref, _ = model(idx)
        cache = model.new_cache()
        pre, _ = model(idx[:, :8], cache=cache, pos=torch.arange(8),
                       attn_mask=M.chunk_mask(0, 8, 'cpu'))
        chunk, _ = model(idx[:, 8:], cache=cache, pos=torch.arange(8, 12),
                         attn_mask=M.chunk_mask(8, 4, 'cpu'))
    assert (torch.cat([pre, chunk], dim=1) - ref).abs().max().item() <= TOL


def test_chunk_mask_is_causal_after_prefix():
    """chunk_mask(c, T): new token j attends to all c cached tokens and new tokens 0..j."""
    m = M.chunk_mask(3, 4, 'cpu')
    assert m.shape == (4, 7)
    for j in range(4):
        assert m[j].tolist() == [True] * (3 + j + 1) + [False] * (4 - j - 1)


def test_custom_mask_changes_the_output():
    """The attn_mask argument is actually used: a mask where the last token sees only itself
    changes its logits (and only its logits)."""
    model = tiny_gpt()
    idx = tokens(6)
    mask = M.chunk_mask(0, 6, 'cpu')
    mask[-1, :-1] = False
    with torch.no_grad():
        ref, _ = model(idx)
        out, _ = model(idx, attn_mask=mask)
    assert (out[:, :-1] - ref[:, :-1]).abs().max().item() <= TOL
    assert (out[:, -1] - ref[:, -1]).abs().max().item() > 1e-4


# -----------------------------------------------------------------------------
# optimizer

def test_configure_optimizers_decays_exactly_the_matrices():
    """AdamW groups: weight decay on every >= 2D parameter, none on the rest, and every
    parameter (the tied wte / lm_head weight counted once) in exactly one group."""
    model = tiny_gpt(bias=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    seen = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(seen) == len(set(seen))
    params = {id(p): p for p in model.parameters()}
    assert set(seen) == set(params)
    assert model.transformer.wte.weight is model.lm_head.weight
    for g in opt.param_groups:
        if g['weight_decay'] > 0:
            assert g['weight_decay'] == 0.1
            assert all(p.dim() >= 2 for p in g['params'])
        else:
            assert all(p.dim() < 2 for p in g['params'])
    n_decay = sum(len(g['params']) for g in opt.param_groups if g['weight_decay'] > 0)
    assert n_decay == sum(1 for p in params.values() if p.dim() >= 2)
    assert any(g['weight_decay'] == 0 for g in opt.param_groups)  # biases / LN gains exist


def test_configure_optimizers_gives_each_named_group_its_lr_scale_and_options():
    """groups=[dict(name, params, lr_scale, **adam_options)]: every group is split into decay /
    no-decay AdamW groups that keep its name, lr_scale and options (here eps), with
    lr = learning_rate * lr_scale; parameters with requires_grad off are left out."""
    model = tiny_gpt(bias=True)
    blocks = list(model.transformer.h.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in blocks)]
    frozen = model.transformer.h[0].attn.c_attn.weight
    frozen.requires_grad_(False)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', [
        dict(name='blocks', params=blocks, lr_scale=0.5),
        dict(name='rest', params=rest, lr_scale=2.0, eps=1e-20)])
    by_name = {}
    for g in opt.param_groups:
        by_name.setdefault(g['name'], []).append(g)
        assert g['lr'] == pytest.approx(1e-3 * g['lr_scale'])
    assert sorted(by_name) == ['blocks', 'rest']
    assert [g['lr_scale'] for g in by_name['blocks']] == [0.5, 0.5]   # decay and no-decay
    assert all(g['lr_scale'] == 2.0 and g['eps'] == 1e-20 for g in by_name['rest'])
    assert all(g['eps'] != 1e-20 for g in by_name['blocks'])
    held = [p for g in opt.param_groups for p in g['params']]
    assert all(p is not frozen for p in held)
    assert len(held) == len(blocks) + len(rest) - 1
