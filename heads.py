"""
Multi-token prediction (MTP): a GPT trunk with n_future heads; head k (1-based) predicts x_{t+k},
head 1 is the next-token (NTP) head. The structure follows Gloeckle et al. (2024) as adapted in
Mehra et al. (2025):

    h_0 = embeddings, h_l = trunk block l output     (l = 1 .. attach_layer)
    s_k = head k's state, by one of three designs    (head_designs.py: block, resblock, sequential)
    logits_k = unembed(ln_f(s_k))                    (ln_f and the unembedding are SHARED)
    L = sum_k lambda_k * CE(logits_k[t], x_{t+k})    (positions without a target are ignored)

With n_future = 1 the model is the plain GPT. Heads are numbered as in the paper's x_{t+k}
everywhere; tensors that stack heads hold head k at index k - 1.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, GPTConfig, UserError
from head_designs import DESIGNS


@dataclass
class MTPConfig(GPTConfig):
    n_future: int = 1            # number of heads; head k predicts x_{t+k}
    attach_layer: int = -1       # trunk depth; -1: n_layer-1 (block), else n_layer
    head_type: str = 'sequential'  # 'sequential' (DeepSeek-V3), 'resblock' (Medusa), 'block'
    whs: bool = False            # weighted hidden states: heads read a learned mix of h_0..h_attach
    head_attention: bool = False   # sequential heads: an MLP (Hydra) or a transformer block

    def __post_init__(self):
        if self.head_type not in DESIGNS:
            raise UserError(f"head_type must be one of {', '.join(DESIGNS)}, not "
                            f"{self.head_type!r}")
        if self.n_future == 1:  # no extra heads: the plain GPT, whatever head_type says
            self.head_type = 'block'
        if self.attach_layer == -1:
            self.attach_layer = self.n_layer - (1 if self.head_type == 'block' else 0)
        if self.n_future < 1:
            raise UserError(f"n_future must be >= 1, got {self.n_future}")
        if not 0 <= self.attach_layer <= self.n_layer:
            raise UserError(f"attach_layer={self.attach_layer} must be in 0..n_layer="
                            f"{self.n_layer}")
        reads_last = self.head_type != 'block'  # resblock and sequential heads read h_L
        if reads_last != (self.attach_layer == self.n_layer):
            raise UserError(f"{self.head_type} heads need attach_layer " + (
                "= n_layer" if reads_last else "< n_layer: each owns the last blocks"))
        if self.whs and self.n_future == 1:
            raise UserError("whs needs n_future > 1 (it mixes hidden states for the extra heads)")


# -----------------------------------------------------------------------------
# the model

class MTPGPT(GPT):
    """GPT with n_future heads on a trunk of its first attach_layer blocks (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer.h = nn.ModuleList(self.transformer.h[:config.attach_layer])  # the trunk
        self.heads = DESIGNS[config.head_type](config)  # the design, chosen once

    def num_cache_layers(self):
        return self.config.attach_layer + self.heads.cache_layers

    def flops_per_token(self, block_size):
        """Training FLOPs per token: 6 per parameter (forward + backward; the tied unembedding
        runs once per head) + the attention scores (PaLM, appendix B)."""
        c = self.config
        return (6 * (self.num_params() + (c.n_future - 1) * c.vocab_size * c.n_embd)
                + 12 * self.num_cache_layers() * c.n_embd * block_size)

    def whs_weights(self):
        """The WHS mixes: (heads that have one, attach_layer + 1), each row the coefficients c_l
        of h_0 .. h_attach, head 1 first (sequential heads: one row, the chain's entry z_2)."""
        coefs = [p.detach() for name, p in self.heads.named_parameters() if 'whs_coef' in name]
        return torch.stack(coefs) if coefs else None

    def ntp_blocks(self):
        """The n_layer blocks of the next-token path (trunk + head 1), to adapt or export it."""
        tail = self.heads.head1_blocks()
        if tail is None:
            raise UserError("cannot adapt this model: its head 1 is a WHS or resblock head, not "
                            "a plain stack of blocks")
        return list(self.transformer.h) + tail

    def trunk_parameters(self):
        """The backbone: embeddings, trunk blocks, and the shared final norm / unembedding."""
        head_ids = {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]

    def set_trunk_trainable(self, trainable):
        for p in self.trunk_parameters():
            p.requires_grad_(trainable)

    def forward(self, idx, targets=None, cache=None, pos=None, attn_mask=None,
                return_hidden=False, n_heads=None, loss_weights=None):
        """Logits (B, T, n_heads, V) of heads 1..n_heads (default all; head k at index k-1) and,
        given the next-token targets (B, T) (targets[t] = x_{t+1}), the weighted MTP loss.
        cache / pos / attn_mask as in GPT.forward. return_hidden adds the trunk hidden states.
        Computing fewer heads (n_heads=1 for plain NTP decoding) leaves the other heads' cache
        layers stale for those positions. Sequential heads read idx shifted (teacher forcing)."""
        attn_mask = self.default_mask(idx, cache, attn_mask)
        trunk_hidden = self.trunk(idx, cache, pos, attn_mask)
        states = self.head_states(idx, trunk_hidden, n_heads, cache, attn_mask, pos)
        logits = torch.stack([self.unembed(state) for _, state in states], dim=2)
        if cache is not None:
            cache.advance(idx.size(1))
        loss = None if targets is None else mtp_loss(logits, targets, loss_weights)
        return (logits, loss, trunk_hidden) if return_hidden else (logits, loss)

    def head_states(self, idx, trunk_hidden, n_heads=None, cache=None, attn_mask=None, pos=None):
        """Yield (k, s_k), head k's state (B, T, C) before ln_f and the unembedding, for
        k = 1..n_heads, one head at a time (so a caller can drop each head's logits before the
        next)."""
        n_heads = self.config.n_future if n_heads is None else n_heads
        return self.heads.states(self, idx, trunk_hidden, n_heads, cache, attn_mask, pos)

    def backward_head_by_head(self, idx, targets, loss_weights=None, loss_scale=1.0):
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
    def from_gpt(cls, source, n_future=1, attach_layer=-1, head_type='sequential', whs=False,
                 head_attention=False):
        """Adapt a trained NTP model (a GPT, or the next-token path of an MTPGPT) to MTP:
        trunk = its first attach_layer blocks; every block head = a copy of its remaining blocks,
        so head 1 reproduces the source model exactly at init (WHS starts as the last layer,
        resblock heads start as the identity, sequential heads 2..n at random)."""
        blocks = source.ntp_blocks()
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
        model.heads.copy_blocks(blocks[config.attach_layer:])
        return model


def next_token_logits(model, idx, **kwargs):
    """Next-token logits (B, T, V) of a GPT, or of an MTPGPT's NTP path (trunk + head 1)."""
    if isinstance(model, MTPGPT):
        return model(idx, n_heads=1, **kwargs)[0][:, :, 0]
    return model(idx, **kwargs)[0]


# -----------------------------------------------------------------------------
# the loss

def loss_weights_for(n_future, loss_weights=None, mtp_weight=1.0, decay=1.0):
    """lambda_1..lambda_n: a list, or lambda_1 = 1, lambda_k = mtp_weight * decay^(k-2)."""
    if loss_weights is None:
        loss_weights = [1.0] + [mtp_weight * decay ** (k - 2) for k in range(2, n_future + 1)]
    if len(loss_weights) != n_future:
        raise UserError(f"loss_weights has {len(loss_weights)} values for {n_future} heads")
    if min(loss_weights) < 0 or not any(loss_weights):
        raise UserError(f"loss weights must be >= 0 and not all 0, got {list(loss_weights)}")
    return list(loss_weights)


def parse_loss_weights(text):
    """--loss_weights: '1,0.5,0.25' -> [1.0, 0.5, 0.25]; '' -> None (mtp_weight, mtp_decay)."""
    try:
        return [float(w) for w in text.split(',')] if text else None
    except ValueError:
        raise UserError(f"loss_weights must be comma-separated numbers, got {text!r}")


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
