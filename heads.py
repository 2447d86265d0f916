"""
Multi-token prediction (MTP) heads on top of the GPT backbone.

An MTP model predicts n_future tokens at every position t: head i (1-based) predicts x_{t+i};
head 1 is the next-token (NTP) head. The structure follows Gloeckle et al. (2024) as adapted in
Mehra et al. (2025):

    h_0 = embeddings, h_l = trunk block l output            (l = 1 .. attach_layer)
    z_i = h_attach                      or, with WHS,  z_i = sum_l softmax(w_i)_l h_l
    head i: n_layer - attach_layer transformer blocks on z_i (model.Block; the 'block' type)
            or a Medusa ResBlock z + SiLU(W z), W zero-initialized (the 'linear' type)
    logits_i = unembed(ln_f(head_i output))       -- ln_f and the unembedding are SHARED

so every 'block' head path is n_layer blocks deep, and with n_future = 1 the model is exactly
the plain GPT. Loss (positions without a target are ignored, never wrapped):

    L = sum_i lambda_i * CE(logits_i[t], x_{t+i})

This file also holds the checkpoint -> model builders (every nanoMTP checkpoint is an MTPGPT)
and the token-weighted top-k accuracy counter used by every evaluation.
"""
import os
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import (GPT, GPTConfig, Block, UserError, run_blocks, init_gpt2_, load_checkpoint,
                   GPT2_SIZES)

WHS_INIT_LOGIT = 12.0  # softmax weight of the last trunk layer at init: 1 - O(L * e^-12)


@dataclass
class MTPConfig(GPTConfig):
    n_future: int = 1          # number of heads; head i predicts x_{t+i}
    attach_layer: int = -1     # trunk depth (blocks before the heads); -1: n_layer-1 (block), n_layer (linear)
    head_type: str = 'block'   # 'block' (Gloeckle: transformer blocks) or 'linear' (Medusa ResBlock)
    whs: bool = False          # weighted hidden states: heads read a learned mix of h_0..h_attach

    def __post_init__(self):
        if self.head_type not in ('block', 'linear'):
            raise UserError(f"head_type must be 'block' or 'linear', not {self.head_type!r}")
        if self.n_future == 1:  # no extra heads: the plain GPT, whatever head_type says
            self.head_type = 'block'
        if self.attach_layer == -1:
            self.attach_layer = self.n_layer - (1 if self.head_type == 'block' else 0)
        if self.n_future < 1:
            raise UserError(f"n_future must be >= 1, got {self.n_future}")
        if not 0 <= self.attach_layer <= self.n_layer:
            raise UserError(f"attach_layer={self.attach_layer} must be in 0..n_layer={self.n_layer}")
        if self.head_type == 'block' and self.attach_layer == self.n_layer:
            raise UserError("block heads need attach_layer < n_layer (each head owns the last "
                            "n_layer - attach_layer blocks)")
        if self.head_type == 'linear' and self.attach_layer != self.n_layer:
            raise UserError("linear (Medusa) heads read the last layer: attach_layer must be n_layer")
        if self.whs and self.n_future == 1:
            raise UserError("whs needs n_future > 1 (it mixes hidden states for the extra heads)")


class Head(nn.Module):
    """One prediction head: optional WHS mix, then its blocks (or a Medusa ResBlock)."""

    def __init__(self, config):
        super().__init__()
        n_in = config.attach_layer + 1  # h_0 .. h_attach
        if config.whs:
            w = torch.zeros(n_in)
            w[-1] = WHS_INIT_LOGIT
            self.whs_logits = nn.Parameter(w)
        if config.head_type == 'block':
            self.blocks = nn.ModuleList([Block(config)
                                         for _ in range(config.n_layer - config.attach_layer)])
        else:
            self.linear = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def mix(self, trunk_hidden):
        """The head's input z from the trunk states [h_0 .. h_attach] (any shape (..., C))."""
        if hasattr(self, 'whs_logits'):
            # WHS: z = sum_l softmax(w)_l * h_l over the trunk's hidden states h_0 .. h_attach
            weights = F.softmax(self.whs_logits, dim=0)
            return torch.einsum('l,l...->...', weights.to(trunk_hidden[-1].dtype),
                                torch.stack(trunk_hidden))
        return trunk_hidden[-1]

    def forward(self, trunk_hidden, cache=None, first_layer=0, attn_mask=None):
        z = self.mix(trunk_hidden)
        if hasattr(self, 'blocks'):
            return run_blocks(z, self.blocks, cache, first_layer, attn_mask)[-1]
        return z + F.silu(self.linear(z))  # Medusa ResBlock; identity at init (linear is zero)


class MTPGPT(GPT):
    """GPT whose last n_layer - attach_layer blocks are replicated into n_future parallel heads."""

    def __init__(self, config):
        super().__init__(config)
        trunk = self.transformer.h[:config.attach_layer]
        self.transformer.h = nn.ModuleList(trunk)
        self.heads = nn.ModuleList([Head(config) for _ in range(config.n_future)])
        init_gpt2_(self.heads, config.n_layer)
        for head in self.heads:
            if hasattr(head, 'linear'):
                nn.init.zeros_(head.linear.weight)

    def head_depth(self):
        return len(self.heads[0].blocks) if self.config.head_type == 'block' else 0

    def num_cache_layers(self):
        return self.config.attach_layer + self.config.n_future * self.head_depth()

    def whs_parameters(self):
        """The WHS mixing logits of every head (empty without WHS)."""
        return [head.whs_logits for head in self.heads if hasattr(head, 'whs_logits')]

    def trunk_parameters(self):
        """The backbone: embeddings, trunk blocks, and the shared final norm / unembedding."""
        head_ids = {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]

    def forward(self, idx, targets=None, cache=None, pos=None, attn_mask=None,
                return_hidden=False, n_heads=None, loss_weights=None):
        """Logits (B, T, n_heads, V) of the first n_heads heads (default all) and, given the
        next-token targets (B, T) (targets[t] = x_{t+1}), the weighted MTP loss.

        cache / pos / attn_mask as in GPT.forward. return_hidden adds the trunk hidden states.
        Computing fewer heads (n_heads=1 for plain NTP decoding) leaves the other heads' cache
        layers stale for those positions.
        """
        attn_mask = self.default_mask(idx, cache, attn_mask)
        trunk_hidden = self.trunk(idx, cache, pos, attn_mask)
        n_heads = self.config.n_future if n_heads is None else n_heads
        logits = torch.stack([self.head_logits(i, trunk_hidden, cache, attn_mask)
                              for i in range(n_heads)], dim=2)
        if cache is not None:
            cache.advance(idx.size(1))
        loss = None
        if targets is not None:
            loss = mtp_loss(logits, targets, loss_weights)
        return (logits, loss, trunk_hidden) if return_hidden else (logits, loss)

    def trunk(self, idx, cache=None, pos=None, attn_mask=None):
        """[h_0, .., h_attach]: the embeddings and every trunk block's output."""
        return run_blocks(self.embed(idx, cache, pos), self.transformer.h, cache, 0, attn_mask)

    def head_logits(self, i, trunk_hidden, cache=None, attn_mask=None):
        """Logits (B, T, V) of head i (0-based: predicts x_{t+i+1}) from the trunk states.
        Head i's blocks use cache layers attach_layer + i * depth onwards."""
        first_layer = self.config.attach_layer + i * self.head_depth()
        return self.unembed(self.heads[i](trunk_hidden, cache, first_layer, attn_mask))

    def draft_logits(self, trunk_hidden):
        """Logits (n_future - 1, V) of linear heads 2..n at ONE position, trunk_hidden = that
        position's trunk states [h_0 .. h_attach], each (C,). The same numbers as head_logits
        (up to rounding), computed as one batched matmul and one unembedding rather than a chain
        of small ops per head: self-speculative decoding pays this every step."""
        heads = list(self.heads)[1:]  # (slicing the ModuleList would build a new module)
        # z: (C,), the last trunk state shared by all heads, or (n - 1, C) with WHS mixes
        z = torch.stack([head.mix(trunk_hidden) for head in heads]) if self.config.whs \
            else trunk_hidden[-1]
        weight = torch.stack([head.linear.weight for head in heads])      # (n - 1, C, C)
        y = (weight @ z[..., None])[..., 0]                              # (n - 1, C)
        if self.config.bias:
            y = y + torch.stack([head.linear.bias for head in heads])
        return self.unembed(z + F.silu(y))

    def forward_backward_sequential(self, idx, targets, loss_weights=None, loss_scale=1.0):
        """The memory-efficient training step (Gloeckle et al.): run the trunk once, then each
        head's forward AND backward in turn, accumulating the gradient at the trunk outputs, so
        only one head's vocab-sized logits are alive at a time; finally backprop the trunk.
        Gives the same gradients as mtp_loss(...).backward() (tested). Returns the loss value."""
        weights = loss_weights_for(self.config.n_future, loss_weights)
        trunk_hidden = self.trunk(idx)
        detached = [h.detach().requires_grad_(h.requires_grad) for h in trunk_hidden]
        total = 0.0
        for i in range(self.config.n_future):
            if weights[i] == 0:  # as in mtp_loss: skipped
                continue
            logits = self.head_logits(i, detached)
            loss_i = weights[i] * head_ce(logits, targets, i + 1)
            (loss_i * loss_scale).backward()
            total += loss_i.detach()
            del logits, loss_i
        pairs = [(h, d.grad) for h, d in zip(trunk_hidden, detached) if d.grad is not None]
        if pairs and pairs[0][0].requires_grad:
            torch.autograd.backward([h for h, _ in pairs], [g for _, g in pairs])
        return total

    @classmethod
    def from_gpt(cls, source, n_future=1, attach_layer=-1, head_type='block', whs=False):
        """Adapt a trained NTP model (a GPT, or the head-1 path of an MTPGPT) to MTP:
        trunk = its first attach_layer blocks; every head = a copy of its remaining blocks, so
        head 1 reproduces the source model exactly at init (WHS starts as the last layer, and
        linear heads start as the identity)."""
        blocks = ntp_blocks(source)
        base = {f.name: getattr(source.config, f.name) for f in fields(GPTConfig)}
        config = MTPConfig(**base, n_future=n_future, attach_layer=attach_layer,
                           head_type=head_type, whs=whs)
        model = cls(config)
        model.transformer.wte.load_state_dict(source.transformer.wte.state_dict())
        model.transformer.wpe.load_state_dict(source.transformer.wpe.state_dict())
        model.transformer.ln_f.load_state_dict(source.transformer.ln_f.state_dict())
        for j in range(config.attach_layer):
            model.transformer.h[j].load_state_dict(blocks[j].state_dict())
        for head in model.heads:
            for j, block in enumerate(getattr(head, 'blocks', [])):
                block.load_state_dict(blocks[config.attach_layer + j].state_dict())
        return model


def ntp_blocks(model):
    """The n_layer blocks on the next-token path of a GPT or an MTPGPT (trunk + head 1)."""
    blocks = list(model.transformer.h)
    if isinstance(model, MTPGPT):
        head = model.heads[0]
        if hasattr(head, 'whs_logits') or hasattr(head, 'linear'):
            raise UserError("cannot adapt this model: its head 1 is a WHS or linear head, not a "
                            "plain stack of blocks")
        blocks += list(head.blocks)
    if len(blocks) != model.config.n_layer:
        raise UserError("cannot adapt this model: its next-token path is not a plain stack of "
                        "n_layer blocks")
    return blocks


# -----------------------------------------------------------------------------
# the loss

def loss_weights_for(n_future, loss_weights=None, mtp_weight=1.0, decay=1.0):
    """lambda_1..lambda_n: an explicit list, or lambda_1 = 1, lambda_i = mtp_weight * decay^(i-2)."""
    if loss_weights is None:
        loss_weights = [1.0] + [mtp_weight * decay ** (i - 2) for i in range(2, n_future + 1)]
    if len(loss_weights) != n_future:
        raise UserError(f"loss_weights has {len(loss_weights)} values for {n_future} heads")
    if min(loss_weights) < 0 or not any(loss_weights):
        raise UserError(f"loss weights must be >= 0 and not all 0, got {list(loss_weights)}")
    return list(loss_weights)


def head_targets(targets, i):
    """Targets of head i (1-based) from next-token targets: head i at t predicts x_{t+i} =
    targets[t+i-1]; the last i-1 positions have no target (-1, ignored)."""
    shifted = targets[:, i - 1:]
    pad = torch.full_like(targets[:, :i - 1], -1)
    return torch.cat([shifted, pad], dim=1)


def head_ce(logits_i, targets, i):
    """Mean cross-entropy of head i over the positions that have a target."""
    return F.cross_entropy(logits_i.reshape(-1, logits_i.size(-1)).float(),
                           head_targets(targets, i).reshape(-1), ignore_index=-1)


def mtp_loss(logits, targets, loss_weights=None):
    """L = sum_i lambda_i * CE(head i logits at t, x_{t+i}); logits (B, T, n, V). Heads with
    lambda_i = 0 are skipped (train.py freezes them: they are not trained at all)."""
    weights = loss_weights_for(logits.size(2), loss_weights)
    return sum(w * head_ce(logits[:, :, i], targets, i + 1) for i, w in enumerate(weights) if w)


# -----------------------------------------------------------------------------
# accuracy bookkeeping (token-weighted: every position with a target counts once)

def count_topk(scores, targets, ks=(1, 5)):
    """For scores (..., V) and targets (...) with -1 = no target: (number of targets,
    {k: number of targets among the k highest scores}). Sum these counts over batches and
    divide at the end, so the accuracy is token-weighted."""
    valid = targets >= 0
    n = int(valid.sum())
    top = scores.topk(min(max(ks), scores.size(-1)), dim=-1).indices
    hit = top == targets.clamp(min=0).unsqueeze(-1)
    return n, {k: int((hit[..., :k].any(-1) & valid).sum()) for k in ks}


# -----------------------------------------------------------------------------
# checkpoints -> models

def model_from_checkpoint(ckpt):
    """Rebuild the MTPGPT a checkpoint dict describes and load its weights."""
    model = MTPGPT(MTPConfig(**ckpt['model_args']))
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v
             for k, v in ckpt['model'].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model_args ({str(e).splitlines()[0]})")
    return model


def val_path(ckpt, data_dir=''):
    """The val.bin of a checkpoint's text (its config's data_dir or data/<dataset>; for heads
    distilled on a model-written corpus, the real text that corpus came from: meta's
    source_data), or data_dir's; '' when the checkpoint names no dataset."""
    config, meta = ckpt.get('config') or {}, ckpt.get('meta') or {}
    data_dir = data_dir or meta.get('source_data') or config.get('data_dir') or (
        os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', config['dataset'])
        if config.get('dataset') else '')
    return os.path.join(data_dir, 'val.bin') if data_dir else ''


def tokenizer_for(ckpt):
    """The checkpoint's tokenizer (data.prepare.Tokenizer); one-line UserErrors when the
    checkpoint has none or tiktoken cannot load its BPE (offline without a cache)."""
    from data.prepare import Tokenizer  # only the decoding scripts need it
    if not ckpt.get('meta'):
        raise UserError("the checkpoint has no tokenizer metadata (meta): cannot encode text")
    try:
        return Tokenizer(ckpt['meta'])
    except Exception as e:
        raise UserError(f"cannot load the tokenizer ({type(e).__name__}); offline? set "
                        f"TIKTOKEN_CACHE_DIR to a tiktoken cache")


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict) from a checkpoint path, or 'gpt2*'."""
    if path in GPT2_SIZES and not os.path.exists(path):
        model = MTPGPT.from_gpt(GPT.from_pretrained(path))
        ckpt = {'meta': {'kind': 'bpe', 'encoding': 'r50k_base', 'vocab_size': 50257},
                'model_args': asdict(model.config), 'config': {}}
    else:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
    return model.to(device).eval(), ckpt
