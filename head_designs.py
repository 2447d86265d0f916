"""
The three MTP head designs, side by side: their parameters, equations and training forward.

Head k (1-based) predicts x_{t+k} from the trunk states h_0 .. h_attach (heads.py builds the
model around them). Every design computes head k's state s_k; ln_f and the unembedding are
shared (logits_k = unembed(ln_f(s_k))):

    z_k = h_attach, or with WHS  z_k = sum_l c_kl h_l  (l = 0 .. attach)
    BlockHeads       (Gloeckle et al. 2024)  s_k = head k's own n_layer - attach_layer blocks on z_k
    ResBlockHeads    (Medusa)                s_k = z_k + SiLU(W_k z_k), W_k zero-initialized
    SequentialHeads  (DeepSeek-V3, EAGLE, Hydra)  s_1 = h_L, and for k >= 2
                     s_k[t] = Body_k(M_k [norm(s_{k-1}[t]); norm(emb(x_{t+k-1}))])
                     (z_2 for s_1 with WHS; Body_k a causal transformer block, or with
                     head_attention=False an MLP block, Hydra's cheaper design)

Parallel heads predict x_{t+k} from the state at t alone. A sequential head also reads the token
before its target: the true x_{t+k-1} in training (teacher forcing); when drafting, the token just
emitted (head 2) or the previous head's draft, so drafts follow what was sampled.

One interface, chosen once from head_type (DESIGNS): states(model, idx, trunk_hidden, n_heads,
cache, attn_mask, pos) yields (k, s_k), head k's state; how each design drafts when decoding is
drafters.py.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F

from model import Block, MLP, run_blocks, init_gpt2_


def whs_coef(config):
    """Weighted hidden states (WHS): a head reads z = sum_l c_l h_l over the trunk's h_0..h_attach
    (the paper: "a weighted combination of hidden states from all layers", so heads need not rely
    on layers that specialized for the next token). c is unconstrained and starts one-hot on
    h_attach: an adapted model starts as its source, and dL/dc_l = <dL/dz, h_l> is of order one
    from the first step (a softmax mix starts saturated, Jacobian ~e^-12: it never left the last
    layer). |c_l| RMS(h_l) says more of a layer's part than c_l. None without WHS."""
    n_in = config.attach_layer + 1
    return nn.Parameter(F.one_hot(torch.tensor(n_in - 1), n_in).float()) if config.whs else None


def mix(coef, trunk_hidden):
    """z from the trunk states [h_0 .. h_attach] (each (..., C)): sum_l c_l h_l, or h_attach."""
    if coef is None:
        return trunk_hidden[-1]
    return torch.einsum('l,l...->...', coef.to(trunk_hidden[-1].dtype), torch.stack(trunk_hidden))


# -----------------------------------------------------------------------------
# one head of each design

class BlockHead(nn.Module):
    """Gloeckle et al.: s_k = head k's own transformer blocks on z_k."""

    def __init__(self, config):
        super().__init__()
        self.whs_coef = whs_coef(config)
        self.blocks = nn.ModuleList([Block(config)
                                     for _ in range(config.n_layer - config.attach_layer)])

    def forward(self, trunk_hidden, cache=None, first_layer=0, attn_mask=None, pos=None):
        z = mix(self.whs_coef, trunk_hidden)
        return run_blocks(z, self.blocks, cache, first_layer, attn_mask, pos)[-1]


class ResBlockHead(nn.Module):
    """Medusa (Cai et al. 2024): s_k = z_k + SiLU(W_k z_k). W_k starts at zero (ResBlockHeads),
    so the head starts as the identity: its logits are the trunk's own next-token logits."""

    def __init__(self, config):
        super().__init__()
        self.whs_coef = whs_coef(config)
        self.linear = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W_k

    def forward(self, trunk_hidden):
        z = mix(self.whs_coef, trunk_hidden)
        return z + F.silu(self.linear(z))


class MLPBlock(nn.Module):
    """A sequential head's body without attention (Hydra, Ankner et al. 2024): x + MLP(LN(x)).
    Context reaches it through s_{k-1} alone, so drafting needs one row and no KV cache."""

    def __init__(self, config):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, attn_mask=None):
        return x + self.mlp(self.ln(x))


class SequentialHead(nn.Module):
    """DeepSeek-V3's MTP module, head k >= 2: s_k = Body_k(M_k [norm(s_{k-1}); norm(emb(x))])."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.norm_state = nn.LayerNorm(C, bias=config.bias)
        self.norm_token = nn.LayerNorm(C, bias=config.bias)
        self.combine = nn.Linear(2 * C, C, bias=config.bias)  # M_k
        self.block = Block(config) if config.head_attention else MLPBlock(config)

    def forward(self, state, token_emb, cache=None, layer=0, attn_mask=None):
        z = self.combine(torch.cat([self.norm_state(state), self.norm_token(token_emb)], dim=-1))
        return self.block(z, cache, layer, attn_mask)

    def token_table(self, wte):
        """(V, C): the token half of M_k, and its bias, for every token x:
        M_k [a; norm(emb(x))] = M_k[:, :C] a + table[x], one lookup when drafting."""
        C, bias = wte.size(1), self.combine.bias
        table = self.norm_token(wte) @ self.combine.weight[:, C:].t()
        return table if bias is None else table + bias


# -----------------------------------------------------------------------------
# the three designs, behind one interface (module docstring)

class Heads(nn.ModuleList):
    """The interface; its defaults serve the parallel designs, where head k is element k-1."""
    cache_layers = 0  # KV cache layers the heads use in a cached forward of every head

    def head_parameters(self, k):
        return list(self[k - 1].parameters())

    def head1_blocks(self):  # head 1's blocks after the trunk (None: not a plain block stack)
        return None

    def copy_blocks(self, blocks):  # adapting a model (MTPGPT.from_gpt): the source's last blocks
        pass


class BlockHeads(Heads):
    """Head k (element k-1) owns depth blocks; in a forward with a KV cache they use cache layers
    attach_layer + (k - 1) * depth onwards. The target's forward runs head 1; the drafter runs
    heads 2..n over the verified positions with a cache of its own."""

    def __init__(self, config):
        super().__init__([BlockHead(config) for _ in range(config.n_future)])
        init_gpt2_(self, config.n_layer)
        self.depth = config.n_layer - config.attach_layer
        self.cache_layers = config.n_future * self.depth

    def states(self, model, idx, trunk_hidden, n_heads, cache=None, attn_mask=None, pos=None):
        for k, head in enumerate(list(self)[:n_heads], start=1):
            first_layer = model.config.attach_layer + (k - 1) * self.depth
            yield k, head(trunk_hidden, cache, first_layer, attn_mask, pos)

    def head1_blocks(self):
        return None if self[0].whs_coef is not None else list(self[0].blocks)

    def copy_blocks(self, blocks):
        for head in self:  # every head a copy of the source's last blocks: head 1 is the source
            for block, source in zip(head.blocks, blocks):
                block.load_state_dict(source.state_dict())


class ResBlockHeads(Heads):
    """Head k (element k-1) is a ResBlock on z_k; its drafter reads the last verified position."""

    def __init__(self, config):
        super().__init__([ResBlockHead(config) for _ in range(config.n_future)])
        init_gpt2_(self, config.n_layer)
        for head in self:  # W_k = 0: every head starts as the identity
            nn.init.zeros_(head.linear.weight)

    def states(self, model, idx, trunk_hidden, n_heads, cache=None, attn_mask=None, pos=None):
        for k, head in enumerate(list(self)[:n_heads], start=1):
            yield k, head(trunk_hidden)


class SequentialHeads(Heads):
    """Heads 2..n (element k-2 is head k); head 1 is the trunk. whs_coef: the chain's entry z_2,
    head 2's parameter."""

    def __init__(self, config):
        super().__init__([SequentialHead(config) for _ in range(config.n_future - 1)])
        init_gpt2_(self, config.n_layer)
        self.whs_coef = whs_coef(config)

    def states(self, model, idx, trunk_hidden, n_heads, cache=None, attn_mask=None, pos=None):
        """Teacher forcing: head k at t reads x_{t+k-1} = idx[t+k-1] (padded past the end, where
        there is no target either)."""
        yield 1, trunk_hidden[-1]
        if n_heads > 1 and cache is not None:
            raise ValueError("sequential heads 2..n decode through their drafter")
        state = mix(self.whs_coef, trunk_hidden)
        for k, head in enumerate(list(self)[:n_heads - 1], start=2):
            tokens = F.pad(idx[:, k - 1:], (0, k - 1))  # x_{t+k-1}
            state = head(state, model.transformer.wte(tokens), attn_mask=attn_mask)
            yield k, state

    def head_parameters(self, k):
        whs = [self.whs_coef] if k == 2 and self.whs_coef is not None else []
        return [] if k == 1 else list(self[k - 2].parameters()) + whs

    def head1_blocks(self):
        return []  # head 1 is the trunk itself

    def chain(self, model, entry, tokens, propose, cache=None):
        """Heads 2..n drafting x_{t+2}..x_{t+n} at the last of m positions t-m+1..t.
        entry:  (m, C) s_1 (or the WHS mix z_2) at those positions
        tokens: (m,) the token after each position, x_{s+1}; the last is x_{t+1}
        propose: a head state (C,) -> (draft token, its q) (drafters.DraftVocab)
        cache:  the heads' KVCache (layer k-2 = head k) holding the positions before these (with
                attention; the caller advances and rolls it back)
        Head k+1 reads x_{s+k}: the tokens shifted by one, head k's draft last. Returns
        (drafts (n-1,), q (n-1, V))."""
        state, picks = entry[None], []
        attn_mask = model.default_mask(tokens[None], cache, None)  # causal after the cached ones
        for k, head in enumerate(self, start=2):
            state = head(state, model.transformer.wte(tokens[None]), cache, k - 2, attn_mask)
            picks.append(propose(state[0, -1]))  # (draft, q)
            tokens = torch.cat([tokens[1:], picks[-1][0].view(1)])
        return tuple(torch.stack(column) for column in zip(*picks))


DESIGNS = {'block': BlockHeads, 'resblock': ResBlockHeads, 'sequential': SequentialHeads}
