"""
The GPT backbone of nanoMTP: a GPT-2-style decoder with an exact KV cache.

Read top to bottom:
  GPTConfig          hyperparameters of the network
  KVCache            per-layer keys/values; append a chunk of T >= 1 tokens, roll back to any length
  CausalSelfAttention, MLP, Block   pre-LN transformer block (the only attention in the codebase)
  GPT                embeddings -> blocks -> final LayerNorm -> tied unembedding; GPT-2 weights

The forward can return every hidden state h_0 (embeddings) .. h_L (last block output), so MTP
heads (heads.py) can branch off at any layer and WHS can mix them. It imports nothing of nanoMTP.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints). CLIs print it as one line and exit."""


GPT2_SIZES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # from_pretrained's names


@dataclass
class GPTConfig:
    block_size: int = 256     # maximum context length (number of learned positions)
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False        # biases in Linear and LayerNorm layers (GPT-2 has them)


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of every attention layer for the tokens seen so far.

    Storage is preallocated per layer as (B, n_head, max_len, head_dim) on first use, so appending
    is an in-place write and rolling back is just moving `length` back: no copies in the decode
    loop. A forward over T new tokens writes positions [length, length + T) of every layer; the
    model calls `advance(T)` once all layers are done. `rollback(n)` forgets everything from
    position n on (speculative decoding after a rejected draft).

    `max_len` may exceed the model's block_size: cache slots are not positions. Marginalization
    appends candidate tokens whose position ids are chosen by the caller (see GPT.forward).
    """

    def __init__(self, n_layers, max_len):
        self.n_layers, self.max_len, self.length = n_layers, max_len, 0
        self.k, self.v = [None] * n_layers, [None] * n_layers  # allocated on first use

    def update(self, layer, k, v):
        """Store k, v (B, H, T, hd) for `layer` after the cached ones; return all keys/values."""
        T = k.size(2)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        if self.k[layer] is not None and self.k[layer].shape[0] != k.shape[0] and self.length:
            raise ValueError("the batch size changed while the cache holds tokens")
        if self.k[layer] is None or self.k[layer].shape[0] != k.shape[0]:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T):
        self.length += T

    def rollback(self, length):
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        self.length = length


# -----------------------------------------------------------------------------
# the transformer block

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0, attn_mask=None):
        """attn_mask: None = causal over the new tokens (and all cached ones), or a bool tensor
        broadcastable to (B, H, T, cached + T), True where a query may attend to a key."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        # is_causal aligns the mask top-left, which is right only when there is no cached prefix;
        # a single new token after a prefix attends to everything (no mask at all).
        is_causal = attn_mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                           is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


def chunk_mask(cached, T, device):
    """Causal mask for T new tokens after `cached` cached ones: (T, cached + T), True = attend."""
    return torch.ones(T, cached + T, dtype=torch.bool, device=device).tril(diagonal=cached)


def run_blocks(x, blocks, cache=None, first_layer=0, attn_mask=None):
    """Run `blocks` in order; return [x, out_1, .., out_n] (the input and every block output).
    Block j reads and writes cache layer first_layer + j."""
    hidden = [x]
    for j, block in enumerate(blocks):
        x = block(x, cache, first_layer + j, attn_mask)
        hidden.append(x)
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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the unembedding is the transposed token embedding
        self.transformer.wte.weight = self.lm_head.weight
        init_gpt2_(self, config.n_layer)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def num_cache_layers(self):
        """How many attention layers a KVCache for this model must hold."""
        return len(self.transformer.h)

    def new_cache(self, max_len=None):
        return KVCache(self.num_cache_layers(), max_len or self.config.block_size)

    # The forward is split in three so heads.py can reuse the pieces: embed, run blocks, unembed.

    def embed(self, idx, cache=None, pos=None):
        """Token + position embeddings (h_0). Positions continue after the cache unless given."""
        B, T = idx.size()
        if pos is None:
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                                 f"{self.config.block_size}")
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def unembed(self, h):
        """Final LayerNorm and the tied unembedding: hidden state -> logits."""
        return self.lm_head(self.transformer.ln_f(h))

    def forward(self, idx, targets=None, cache=None, pos=None, attn_mask=None,
                return_hidden=False):
        """Logits (B, T, V) and, given targets (B, T), the mean next-token cross-entropy.

        cache:     a KVCache; the T tokens are appended after its contents (prefill when empty).
        pos:       position ids (T,), by default continuing after the cache.
        attn_mask: bool (T, cached + T) or broadcastable to (B, H, T, cached + T); default causal.
        return_hidden: also return [h_0, .., h_L], h_0 = embeddings, h_L = last block output.
        """
        attn_mask = self.default_mask(idx, cache, attn_mask)
        x = self.embed(idx, cache, pos)
        hidden = run_blocks(x, self.transformer.h, cache, 0, attn_mask)
        if cache is not None:
            cache.advance(idx.size(1))
        logits = self.unembed(hidden[-1])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @staticmethod
    def default_mask(idx, cache, attn_mask):
        """A chunk of T > 1 tokens after a cached prefix needs an explicit causal mask."""
        T = idx.size(1)
        if attn_mask is None and cache is not None and cache.length > 0 and T > 1:
            return chunk_mask(cache.length, T, idx.device)
        return attn_mask

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, groups=None):
        """AdamW with weight decay on matrices (>= 2D) only, never on biases or LayerNorm gains.

        groups: optional list of dict(name=..., params=[...], lr_scale=s, **adam_options) giving
        parts of the model their own LR (train.py: trunk, heads, WHS weights) or Adam options;
        each is split into decay / no-decay. The LR schedule sets group['lr'] = lr * lr_scale.
        Parameters with requires_grad off (frozen) are left out.
        """
        groups = groups or [dict(name='all', params=list(self.parameters()), lr_scale=1.0)]
        adam_groups = []
        for group in groups:
            params = [p for p in group['params'] if p.requires_grad]
            for ps, wd in (([p for p in params if p.dim() >= 2], weight_decay),
                           ([p for p in params if p.dim() < 2], 0.0)):
                if ps:
                    adam_groups.append({**group, 'params': ps, 'weight_decay': wd,
                                        'lr': learning_rate * group['lr_scale']})
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(adam_groups, lr=learning_rate, betas=betas,
                                 **(dict(fused=True) if fused else {}))

    @classmethod
    def from_pretrained(cls, model_type, dropout=0.0):
        """GPT-2 weights from Hugging Face `transformers` (optional dependency, needs a download)."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise UserError("loading GPT-2 weights needs the optional package transformers: "
                            "pip install transformers")
        if model_type not in GPT2_SIZES:
            raise UserError(f"unknown GPT-2 model {model_type!r}; choose from {GPT2_SIZES}")
        try:
            hf = GPT2LMHeadModel.from_pretrained(model_type)
        except Exception as e:  # network, disk, hub errors: one line, with the cause
            raise UserError(f"could not load {model_type} weights from Hugging Face "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return cls.from_hf(hf, dropout=dropout)

    @classmethod
    def from_hf(cls, hf_model, dropout=0.0):
        """Convert a transformers GPT2LMHeadModel (the path from_pretrained uses)."""
        c = hf_model.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, dropout=dropout, bias=True)
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf_model.state_dict().items()
                 if not k.endswith(('.attn.masked_bias', '.attn.bias'))}
        # HF's GPT-2 uses Conv1D modules: their weights are the transpose of nn.Linear's
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight',
                      'mlp.c_proj.weight')
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k not in sd:
                    raise UserError(f"unexpected GPT-2 weight {k}")
                sd[k].copy_(v.t() if k.endswith(transposed) else v)
        return model
