"""
The GPT backbone of nanoMTP: a GPT-2-style decoder with an exact KV cache. GPT-NeoX (Pythia) is a
set of options of the same classes: rotary_pct, parallel_residual, tie_embeddings, gelu, bias.

The forward can return every hidden state h_0 (embeddings) .. h_L (last block output), so MTP
heads (heads.py) can branch off at any layer and WHS can mix them. It imports nothing of nanoMTP;
weights from and to transformers (GPT-2, Pythia) are convert.py's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints). CLIs print it as one line and exit."""


@dataclass
class GPTConfig:
    block_size: int = 256     # maximum context length (number of learned positions)
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False        # biases in Linear and LayerNorm layers (GPT-2 and Pythia have them)
    # GPT-NeoX (Pythia) options; the defaults are GPT-2 (and old checkpoints, which lack them)
    rotary_pct: float = 0.0   # > 0: rotary positions on this fraction of head dims, no learned ones
    rotary_base: float = 10000.0
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), not one after the other
    tie_embeddings: bool = True      # unembedding = token embedding (GPT-2); Pythia has its own
    gelu: str = 'tanh'        # GPT-2's tanh approximation; 'none' = the exact GELU (Pythia)


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of every attention layer for the tokens seen so far.
    Storage is preallocated per layer as (B, n_head, max_len, head_dim) on first use, so appending
    T >= 1 tokens is an in-place write and rollback(n) (speculative decoding after a rejected
    draft) just moves `length` back: no copies in the decode loop. A forward over T new tokens
    writes positions [length, length + T) of every layer, then calls advance(T). max_len may
    exceed block_size: cache slots are not positions (marginalization chooses its position ids)."""

    def __init__(self, n_layers, max_len):
        self.max_len, self.length = max_len, 0
        self.k, self.v = [None] * n_layers, [None] * n_layers  # allocated on first use

    def update(self, layer, k, v):
        """Store k, v (B, H, T, hd) for `layer` after the cached ones; return all keys/values."""
        end, old = self.length + k.size(2), self.k[layer]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        if old is None or old.shape[0] != k.shape[0]:  # first use, or a new batch size
            if old is not None and self.length:
                raise ValueError("the batch size changed while the cache holds tokens")
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        self.k[layer][:, :, self.length:end], self.v[layer][:, :, self.length:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T):
        self.length += T

    def rollback(self, length):
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        self.length = length


def rotate(q, k, pos, n_rot, base):
    """Rotary position embedding (GPT-NeoX) of q and k (B, H, T, hd) at positions pos (T,) or
    per row (B, T).
    The first n_rot dims of each head are n_rot/2 pairs (i, i + n_rot/2); pair i is rotated by the
    angle pos * base^(-2i/n_rot). A query at position m and a key at n then meet in the dot product
    rotated by (m - n) only: attention sees relative positions, and a cached key never changes.
    Pythia rotates a quarter of each head (rotary_pct 0.25); the rest carries no position."""
    inv_freq = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float, device=q.device) / n_rot)
    angles = pos.to(q.device).float()[..., None] * inv_freq.repeat(2)  # (.., T, n_rot): i twice
    angles = angles[:, None] if pos.dim() == 2 else angles  # per-row pos (B, T): (B, 1, T, n_rot)
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)

    def apply(x):
        r, half = x[..., :n_rot], n_rot // 2
        rotated_half = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
        return torch.cat([r * cos + rotated_half * sin, x[..., n_rot:]], dim=-1)
    return apply(q), apply(k)


# -----------------------------------------------------------------------------
# the transformer block

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.rotary_base = config.rotary_base
        self.n_rot = int(config.n_embd // config.n_head * config.rotary_pct)  # 0: GPT-2

    def forward(self, x, cache=None, layer=0, attn_mask=None, pos=None):
        """attn_mask, pos: as in GPT.forward (None: causal, and positions after the cache)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.n_rot:  # GPT-NeoX: rotate q and k by their positions (keys are cached rotated)
            if pos is None:  # after the cached tokens
                start = cache.length if cache is not None else 0
                pos = torch.arange(start, start + T, device=x.device)
            q, k = rotate(q, k, pos, self.n_rot, self.rotary_base)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # is_causal aligns the mask top-left, which is right only when there is no cached prefix;
        # a single new token after a prefix attends to everything (no mask at all).
        is_causal = attn_mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)  # 'tanh' (GPT-2) or 'none' (exact: Pythia)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). With parallel_residual
    (GPT-NeoX) both branches read the same x: x + attn(ln_1(x)) + mlp(ln_2(x)), so the MLP does
    not see this block's attention output (one residual add per block, and the two can overlap)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x, cache=None, layer=0, attn_mask=None, pos=None):
        a = self.attn(self.ln_1(x), cache, layer, attn_mask, pos)
        if self.parallel_residual:  # GPT-NeoX
            return x + a + self.mlp(self.ln_2(x))
        x = x + a
        return x + self.mlp(self.ln_2(x))


def chunk_mask(cached, T, device):
    """Causal mask for T new tokens after `cached` cached ones: (T, cached + T), True = attend."""
    return torch.ones(T, cached + T, dtype=torch.bool, device=device).tril(diagonal=cached)


def run_blocks(x, blocks, cache=None, first_layer=0, attn_mask=None, pos=None):
    """Run `blocks` in order; return [x, out_1, .., out_n] (the input and every block output).
    Block j reads and writes cache layer first_layer + j. pos: as in GPT.forward (rotary)."""
    hidden = [x]
    for j, block in enumerate(blocks):
        hidden.append(block(hidden[-1], cache, first_layer + j, attn_mask, pos))
    return hidden


def init_gpt2_(module, n_layer):
    """GPT-2 initialization: N(0, 0.02) weights, zero biases; the residual projections (c_proj)
    get std 0.02 / sqrt(2 * n_layer) because every block adds two of them to the residual."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith('c_proj') else 0.02
            torch.nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, 'bias', None) is not None:
                torch.nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.rotary_pct:  # GPT-NeoX: positions are rotations inside attention, no table
            del self.transformer['wpe']
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # the unembedding is the transposed token embedding (GPT-2)
            self.transformer.wte.weight = self.lm_head.weight
        init_gpt2_(self, config.n_layer)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def ntp_blocks(self):
        """The n_layer blocks of the next-token path (heads.MTPGPT: trunk + head 1)."""
        return list(self.transformer.h)

    def num_cache_layers(self):
        """How many attention layers a KVCache for this model must hold."""
        return len(self.transformer.h)

    def new_cache(self, max_len=None):
        return KVCache(self.num_cache_layers(), max_len or self.config.block_size)

    # The forward is split in three so heads.py can reuse the pieces: embed, trunk, unembed.

    def embed(self, idx, cache=None, pos=None):
        """Token + position embeddings (h_0; rotary models: token embeddings only)."""
        if pos is None:  # after the cached tokens
            T, start = idx.size(1), cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                                 f"{self.config.block_size}")
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)
        if 'wpe' in self.transformer:
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def trunk(self, idx, cache=None, pos=None, attn_mask=None):
        """[h_0, .., h_L]: the embeddings and every block's output (an MTPGPT: up to h_attach).
        attn_mask as forward's, but with no default: a chunk after a cached prefix passes one."""
        return run_blocks(self.embed(idx, cache, pos), self.transformer.h, cache, 0, attn_mask, pos)

    def unembed(self, h):
        """Final LayerNorm and the unembedding: hidden state -> logits."""
        return self.lm_head(self.transformer.ln_f(h))

    def forward(self, idx, targets=None, cache=None, pos=None, attn_mask=None, return_hidden=False):
        """Logits (B, T, V) and, given targets (B, T), the mean next-token cross-entropy.
        cache:     a KVCache; the T tokens are appended after its contents (prefill when empty).
        pos:       position ids (T,) or per row (B, T), by default continuing after the cache.
        attn_mask: bool (T, cached + T) or broadcastable to (B, H, T, cached + T), True = attend;
                   default causal.
        return_hidden: also return [h_0, .., h_L], h_0 = embeddings, h_L = last block output."""
        hidden = self.trunk(idx, cache, pos, self.default_mask(idx, cache, attn_mask))
        if cache is not None:
            cache.advance(idx.size(1))
        logits, loss = self.unembed(hidden[-1]), None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @staticmethod
    def default_mask(idx, cache, attn_mask):
        """A chunk of T > 1 tokens after a cached prefix needs an explicit causal mask: given as
        0 / -inf to add to the scores, which attention would otherwise convert in every layer."""
        T = idx.size(1)
        if attn_mask is None and cache is not None and cache.length > 0 and T > 1:
            attend = chunk_mask(cache.length, T, idx.device)
            return torch.zeros(attend.shape, device=idx.device).masked_fill_(~attend, -math.inf)
        return attn_mask

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, groups=None):
        """AdamW with weight decay on matrices (>= 2D) only, never on biases or LayerNorm gains.
        groups: optional [dict(name=..., params=[...], lr_scale=s, **adam_options)], parts of the
        model with their own LR (train.py: trunk, heads, WHS weights) or Adam options, each split
        into decay / no-decay; the schedule sets group['lr'] = lr * lr_scale. Frozen: left out."""
        groups = groups or [dict(name='all', params=list(self.parameters()), lr_scale=1.0)]
        adam_groups = []
        for group in groups:
            params = [p for p in group['params'] if p.requires_grad]
            for ps, wd in (([p for p in params if p.dim() >= 2], weight_decay),
                           ([p for p in params if p.dim() < 2], 0.0)):
                if ps:
                    adam_groups.append({**group, 'params': ps, 'weight_decay': wd,
                                        'lr': learning_rate * group['lr_scale']})
        return torch.optim.AdamW(adam_groups, lr=learning_rate, betas=betas,  # (fused: torch 2)
                                 **(dict(fused=True) if device_type == 'cuda' else {}))
