"""
Multi-token prediction (MTP) heads on top of the GPT backbone.

An MTP model predicts n_future tokens at every position t: head k (1-based) predicts x_{t+k};
head 1 is the next-token (NTP) head. The structure follows Gloeckle et al. (2024) as adapted in
Mehra et al. (2025):

    h_0 = embeddings, h_l = trunk block l output            (l = 1 .. attach_layer)
    z_k = h_attach                      or, with WHS,  z_k = sum_l c_kl h_l   (l = 0 .. attach)
    logits_k = unembed(ln_f(s_k))       -- ln_f and the unembedding are SHARED; s_k is head k's
                                           state, one of three designs:
    'block'      (Gloeckle)  s_k = the n_layer - attach_layer transformer blocks of head k on z_k
    'resblock'   (Medusa)    s_k = z_k + SiLU(W_k z_k), W_k zero-initialized
    'sequential' (DeepSeek-V3 MTP modules, EAGLE)   s_1 = h_L, and for k >= 2
                 s_k[t] = Block_k(M_k [norm(s_{k-1}[t]); norm(emb(x_{t+k-1}))])
                 (head 2 reads z_2 for s_1 when WHS is on; Block_k is causal over t, or
                 with head_attention=False an MLP block, Hydra's cheaper design)

Parallel heads predict x_{t+k} from the state at t alone. A sequential head also reads the token
before the one it predicts: the true x_{t+k-1} in training (teacher forcing); when drafting, the
token just emitted (head 2) or the previous head's draft, so drafts follow what was sampled.
With n_future = 1 the model is the plain GPT. Loss (positions without a target are ignored):

    L = sum_k lambda_k * CE(logits_k[t], x_{t+k})

Heads are numbered as in the paper's x_{t+k} everywhere: head k (1-based) predicts k tokens ahead;
tensors that stack heads hold head k at index k - 1.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, GPTConfig, Block, MLP, UserError, run_blocks, init_gpt2_

HEAD_TYPES = ('block', 'resblock', 'sequential')
HEAD_TYPE_ALIASES = {'linear': 'resblock'}  # the ResBlock head's old name (old checkpoints, flags)


@dataclass
class MTPConfig(GPTConfig):
    n_future: int = 1          # number of heads; head k predicts x_{t+k}
    attach_layer: int = -1     # trunk depth; -1: n_layer-1 (block), else n_layer
    head_type: str = 'block'   # 'block' (Gloeckle), 'resblock' (Medusa), 'sequential' (DeepSeek)
    whs: bool = False          # weighted hidden states: heads read a learned mix of h_0..h_attach
    head_attention: bool = True  # sequential heads: a transformer block (DeepSeek-V3) or an MLP

    def __post_init__(self):
        self.head_type = HEAD_TYPE_ALIASES.get(self.head_type, self.head_type)
        if self.head_type not in HEAD_TYPES:
            raise UserError(f"head_type must be one of {', '.join(HEAD_TYPES)}, not "
                            f"{self.head_type!r}")
        if self.n_future == 1:  # no extra heads: the plain GPT, whatever head_type says
            self.head_type = 'block'
        if self.attach_layer == -1:
            self.attach_layer = self.n_layer - (1 if self.head_type == 'block' else 0)
        if self.n_future < 1:
            raise UserError(f"n_future must be >= 1, got {self.n_future}")
        if not 0 <= self.attach_layer <= self.n_layer:
            raise UserError(f"attach_layer={self.attach_layer} must be in 0..n_layer={self.n_layer}")
        reads_last = self.head_type != 'block'  # resblock and sequential heads read h_L
        if reads_last != (self.attach_layer == self.n_layer):
            raise UserError(f"{self.head_type} heads need attach_layer " + (
                "= n_layer" if reads_last else "< n_layer: each owns the last blocks"))
        if self.whs and self.n_future == 1:
            raise UserError("whs needs n_future > 1 (it mixes hidden states for the extra heads)")


class ResBlock(nn.Module):
    """Medusa's head (Cai et al. 2024): z + SiLU(W z). W starts at zero, so the head starts as
    the identity: its logits are the trunk's own next-token logits."""

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        nn.init.zeros_(self.linear.weight)

    def forward(self, z):
        return z + F.silu(self.linear(z))


class MLPBlock(nn.Module):
    """A sequential head's body without attention (Hydra, Ankner et al. 2024): x + MLP(LN(x)),
    a block minus its attention (context reaches it through s_{k-1}). The main job's choice:
    as good as the block here, its drafts a third cheaper (results/sequential_heads.md)."""

    def __init__(self, config):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, attn_mask=None):
        return x + self.mlp(self.ln(x))


class Head(nn.Module):
    """One prediction head: optional WHS mix, then its blocks (or a Medusa ResBlock).

    Weighted hidden states (WHS): the head reads z = sum_l c_l h_l, a learned combination of the
    trunk's hidden states h_0 .. h_attach instead of h_attach alone (the paper: heads take "a
    weighted combination of hidden states from all layers", so they need not rely on layers that
    specialized for the next token). The coefficients c are unconstrained and start one-hot on
    h_attach, so an adapted model starts exactly as its source, and dL/dc_l = <dL/dz, h_l> is of
    order one for every layer from the first step. (A softmax mix would start saturated, its
    Jacobian ~e^-12: measured, it never left the last layer.) c is a superset of a convex mix.
    As the h_l differ in scale, |c_l| RMS(h_l) says more of a layer's part than c_l (study.py)."""

    def __init__(self, config, k):
        super().__init__()
        n_in = config.attach_layer + 1  # h_0 .. h_attach
        sequential = config.head_type == 'sequential'
        if config.whs and (not sequential or k == 2):  # a sequential chain enters at head 2
            self.whs_coef = nn.Parameter(F.one_hot(torch.tensor(n_in - 1), n_in).float())
        if config.head_type == 'block':
            self.blocks = nn.ModuleList([Block(config)
                                         for _ in range(config.n_layer - config.attach_layer)])
        elif config.head_type == 'resblock':
            self.resblock = ResBlock(config)
        elif k >= 2:  # sequential; head 1 is the trunk itself (no parameters)
            C = config.n_embd
            self.norm_state = nn.LayerNorm(C, bias=config.bias)
            self.norm_token = nn.LayerNorm(C, bias=config.bias)
            self.combine = nn.Linear(2 * C, C, bias=config.bias)  # M_k
            self.block = Block(config) if config.head_attention else MLPBlock(config)

    def mix(self, trunk_hidden):
        """The head's input z from the trunk states [h_0 .. h_attach] (any shape (..., C))."""
        if hasattr(self, 'whs_coef'):  # WHS: z = sum_l c_l h_l over h_0 .. h_attach
            return torch.einsum('l,l...->...', self.whs_coef.to(trunk_hidden[-1].dtype),
                                torch.stack(trunk_hidden))
        return trunk_hidden[-1]

    def forward(self, trunk_hidden, cache=None, first_layer=0, attn_mask=None, pos=None):
        """A parallel head's state s_k from the trunk states."""
        z = self.mix(trunk_hidden)
        if hasattr(self, 'blocks'):
            return run_blocks(z, self.blocks, cache, first_layer, attn_mask, pos)[-1]
        return self.resblock(z)

    def step(self, state, token_emb, cache=None, layer=0, attn_mask=None):
        """A sequential head's state: Block(M [norm(state); norm(emb(token))]), (B, T, C)."""
        z = self.combine(torch.cat([self.norm_state(state), self.norm_token(token_emb)], dim=-1))
        return self.block(z, cache, layer, attn_mask)


class MTPGPT(GPT):
    """GPT with n_future heads on a trunk of its first attach_layer blocks (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer.h = nn.ModuleList(self.transformer.h[:config.attach_layer])  # the trunk
        self.heads = nn.ModuleList([Head(config, k) for k in range(1, config.n_future + 1)])
        init_gpt2_(self.heads, config.n_layer)
        for head in self.heads:
            if hasattr(head, 'resblock'):  # (init_gpt2_ just drew it: back to the identity)
                nn.init.zeros_(head.resblock.linear.weight)

    def head_depth(self):
        return len(self.heads[0].blocks) if self.config.head_type == 'block' else 0

    def num_cache_layers(self):
        return self.config.attach_layer + self.config.n_future * self.head_depth()

    def whs_weights(self):
        """The WHS mix of every head: (n_future, attach_layer + 1), row k-1 = head k's
        coefficients c_l of h_0 .. h_attach (None without WHS). Sequential heads: one row, the
        chain's entry (head 2)."""
        if not self.config.whs:
            return None
        return torch.stack([head.whs_coef.detach() for head in self.heads
                            if hasattr(head, 'whs_coef')])

    def ntp_blocks(self):
        return ntp_blocks(self)

    def trunk_parameters(self):
        """The backbone: embeddings, trunk blocks, and the shared final norm / unembedding."""
        head_ids = {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]

    def forward(self, idx, targets=None, cache=None, pos=None, attn_mask=None,
                return_hidden=False, n_heads=None, loss_weights=None):
        """Logits (B, T, n_heads, V) of heads 1..n_heads (default all; head k at index k-1) and,
        given the next-token targets (B, T) (targets[t] = x_{t+1}), the weighted MTP loss.

        cache / pos / attn_mask as in GPT.forward. return_hidden adds the trunk hidden states.
        Computing fewer heads (n_heads=1 for plain NTP decoding) leaves the other heads' cache
        layers stale for those positions. Sequential heads read idx shifted (teacher forcing).
        """
        attn_mask = self.default_mask(idx, cache, attn_mask)
        trunk_hidden = self.trunk(idx, cache, pos, attn_mask)
        states = self.head_states(idx, trunk_hidden, n_heads, cache, attn_mask, pos)
        logits = torch.stack([self.unembed(state) for _, state in states], dim=2)
        if cache is not None:
            cache.advance(idx.size(1))
        loss = None if targets is None else mtp_loss(logits, targets, loss_weights)
        return (logits, loss, trunk_hidden) if return_hidden else (logits, loss)

    def trunk(self, idx, cache=None, pos=None, attn_mask=None):
        """[h_0, .., h_attach]: the embeddings and every trunk block's output."""
        return run_blocks(self.embed(idx, cache, pos), self.transformer.h, cache, 0, attn_mask,
                          pos)

    def head_states(self, idx, trunk_hidden, n_heads=None, cache=None, attn_mask=None, pos=None):
        """Yield (k, s_k), head k's state (B, T, C) before ln_f and the unembedding, for
        k = 1..n_heads, one head at a time (so a caller can drop each head's logits before the
        next). Parallel head k's blocks use cache layers attach_layer + (k - 1) * depth onwards
        (pos: rotary positions, as in GPT.forward).
        Sequential head k reads x_{t+k-1} = idx[t+k-1] (padded past the end, where there is no
        target either); its block has no cache here (decoding drafts with draft_chain)."""
        n_heads = self.config.n_future if n_heads is None else n_heads
        state = None
        for k in range(1, n_heads + 1):
            head = self.heads[k - 1]
            if self.config.head_type != 'sequential':
                first_layer = self.config.attach_layer + (k - 1) * self.head_depth()
                state = head(trunk_hidden, cache, first_layer, attn_mask, pos)
            elif k == 1:
                state = trunk_hidden[-1]
            else:
                if cache is not None:
                    raise ValueError("sequential heads 2..n decode through draft_chain")
                tokens = F.pad(idx[:, k - 1:], (0, k - 1))  # x_{t+k-1}
                entry = head.mix(trunk_hidden) if k == 2 else state
                state = head.step(entry, self.transformer.wte(tokens), attn_mask=attn_mask)
            yield k, state

    def head_logits(self, k, trunk_hidden, idx=None):
        """Logits (B, T, V) of head k (predicts x_{t+k}) from the trunk states (and, for
        sequential heads, the tokens idx they read)."""
        return self.unembed(list(self.head_states(idx, trunk_hidden, n_heads=k))[-1][1])

    @torch.no_grad()
    def draft_chain(self, entry, tokens, pick, cache=None):
        """Sequential heads 2..n drafting x_{t+2}..x_{t+n} at the last of m positions.

        entry:  (m, C) head 2's state input (s_1, or the WHS mix z_2) at positions t-m+1..t
        tokens: (m,) x_{s+1} at those positions; the last is x_{t+1}, the token just emitted
        pick:   logits (V,) -> (draft token, its draft probabilities q)
        cache:  the heads' KVCache (layer k-2 = head k) holding the positions before these; the
                caller advances and rolls it back. Head k+1 reads x_{s+k}: the tokens shifted
        by one, head k's draft last. Returns (drafts (n-1,), q (n-1, V))."""
        state, picks = entry[None], []
        attn_mask = self.default_mask(tokens[None], cache, None)  # causal after the cached ones
        for k in range(2, self.config.n_future + 1):
            state = self.heads[k - 1].step(state, self.transformer.wte(tokens[None]), cache, k - 2,
                                           attn_mask)
            picks.append(pick(self.unembed(state[0, -1])))  # (draft, q)
            tokens = torch.cat([tokens[1:], picks[-1][0].view(1)])
        return tuple(torch.stack(column) for column in zip(*picks))

    def draft_logits(self, trunk_hidden):
        """Logits (n_future - 1, V) of resblock heads 2..n at ONE position, trunk_hidden = that
        position's trunk states [h_0 .. h_attach], each (C,). The same numbers as head_logits
        (up to rounding), computed as one batched matmul and one unembedding rather than a chain
        of small ops per head: self-speculative decoding pays this every step."""
        heads = list(self.heads)[1:]  # (slicing the ModuleList would build a new module)
        # z: (C,), the last trunk state shared by all heads, or (n - 1, C) with WHS mixes
        z = torch.stack([head.mix(trunk_hidden) for head in heads]) if self.config.whs \
            else trunk_hidden[-1]
        weight = torch.stack([head.resblock.linear.weight for head in heads])  # (n - 1, C, C)
        y = (weight @ z[..., None])[..., 0]                                  # (n - 1, C)
        if self.config.bias:
            y = y + torch.stack([head.resblock.linear.bias for head in heads])
        return self.unembed(z + F.silu(y))

    def forward_backward_sequential(self, idx, targets, loss_weights=None, loss_scale=1.0):
        """The memory-efficient training step (Gloeckle et al.): the trunk and the heads' states
        once, then each head's logits, loss and backward in turn, down to its state only, so one
        head's vocab-sized logits are alive at a time; finally one backward from every head's
        state through the heads and the trunk. Gives the same gradients as
        mtp_loss(...).backward() (tested). Returns the loss value."""
        weights = loss_weights_for(self.config.n_future, loss_weights)
        states_grads, total = [], 0.0
        for (k, state), weight in zip(self.head_states(idx, self.trunk(idx)), weights):
            if weight == 0:  # as in mtp_loss: skipped (a sequential chain still runs through it)
                continue
            leaf = state.detach().requires_grad_(state.requires_grad)
            loss_k = weight * head_ce(self.unembed(leaf), targets, k)
            if loss_k.requires_grad:  # (not when this head and the shared ln_f are all frozen)
                (loss_k * loss_scale).backward()
            total += loss_k.detach()
            if leaf.grad is not None:
                states_grads.append((state, leaf.grad))
        if states_grads:
            torch.autograd.backward(*zip(*states_grads))
        return total

    @classmethod
    def from_gpt(cls, source, n_future=1, attach_layer=-1, head_type='block', whs=False,
                 head_attention=True):
        """Adapt a trained NTP model (a GPT, or the head-1 path of an MTPGPT) to MTP:
        trunk = its first attach_layer blocks; every head = a copy of its remaining blocks, so
        head 1 reproduces the source model exactly at init (WHS starts as the last layer, and
        resblock heads start as the identity)."""
        blocks = ntp_blocks(source)
        base = {f.name: getattr(source.config, f.name) for f in fields(GPTConfig)}
        config = MTPConfig(**base, n_future=n_future, attach_layer=attach_layer,
                           head_type=head_type, whs=whs, head_attention=head_attention)
        model = cls(config)
        for name in ('wte', 'wpe', 'ln_f'):  # embeddings, the shared final norm and unembedding
            if name in model.transformer:  # (rotary models have no wpe)
                model.transformer[name].load_state_dict(source.transformer[name].state_dict())
        model.lm_head.load_state_dict(source.lm_head.state_dict())  # (its own if untied)
        for j in range(config.attach_layer):
            model.transformer.h[j].load_state_dict(blocks[j].state_dict())
        for head in model.heads:  # (block heads; sequential heads 2..n start at random)
            for j, block in enumerate(getattr(head, 'blocks', [])):
                block.load_state_dict(blocks[config.attach_layer + j].state_dict())
        return model


def ntp_blocks(model):
    """The n_layer blocks on the next-token path of a GPT or an MTPGPT (trunk + head 1)."""
    blocks = list(model.transformer.h)
    if isinstance(model, MTPGPT):
        head = model.heads[0]
        if hasattr(head, 'whs_coef') or hasattr(head, 'resblock'):
            raise UserError("cannot adapt this model: its head 1 is a WHS or resblock head, not "
                            "a plain stack of blocks")
        blocks += list(getattr(head, 'blocks', []))  # (a sequential head 1 is the trunk)
    if len(blocks) != model.config.n_layer:
        raise UserError("cannot adapt this model: its next-token path is not a plain stack of "
                        "n_layer blocks")
    return blocks


# -----------------------------------------------------------------------------
# the loss

def loss_weights_for(n_future, loss_weights=None, mtp_weight=1.0, decay=1.0):
    """lambda_1..lambda_n: an explicit list, or lambda_1 = 1, lambda_k = mtp_weight * decay^(k-2)."""
    if loss_weights is None:
        loss_weights = [1.0] + [mtp_weight * decay ** (k - 2) for k in range(2, n_future + 1)]
    if len(loss_weights) != n_future:
        raise UserError(f"loss_weights has {len(loss_weights)} values for {n_future} heads")
    if min(loss_weights) < 0 or not any(loss_weights):
        raise UserError(f"loss weights must be >= 0 and not all 0, got {list(loss_weights)}")
    return list(loss_weights)


def head_targets(targets, k):
    """Targets of head k from next-token targets: head k at t predicts x_{t+k} = targets[t+k-1];
    the last k-1 positions have no target (-1, ignored)."""
    return torch.cat([targets[:, k - 1:], torch.full_like(targets[:, :k - 1], -1)], dim=1)


def head_ce(logits_k, targets, k):
    """Mean cross-entropy of head k over the positions that have a target."""
    return F.cross_entropy(logits_k.reshape(-1, logits_k.size(-1)).float(),
                           head_targets(targets, k).reshape(-1), ignore_index=-1)


def mtp_loss(logits, targets, loss_weights=None):
    """L = sum_k lambda_k * CE(head k logits at t, x_{t+k}); logits (B, T, n, V), head k at
    index k-1. Heads with lambda_k = 0 are skipped (train.py freezes them: not trained at all)."""
    weights = loss_weights_for(logits.size(2), loss_weights)
    return sum(w * head_ce(logits[:, :, k - 1], targets, k)
               for k, w in enumerate(weights, start=1) if w)
