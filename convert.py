"""Weights from and to Hugging Face transformers (optional: imported when a conversion runs, its
absence a one-line error): GPT-2 (GPT2LMHeadModel) and GPT-NeoX / Pythia (GPTNeoXForCausalLM),
both options of model.GPT. from_pretrained('gpt2' or 'EleutherAI/pythia-70m': a download),
from_hf(a transformers model in memory), to_hf(model: its next-token path, exported)."""
import torch

from model import GPT, GPTConfig, UserError

GPT2_SIZES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # from_pretrained's names
PYTHIA = 'EleutherAI/pythia-'  # from_pretrained also takes EleutherAI/pythia-70m .. -12b


def from_pretrained(name, dropout=0.0):
    """GPT-2 or Pythia weights from Hugging Face `transformers` (optional, needs a download)."""
    transformers = import_transformers()
    if name not in GPT2_SIZES and not name.startswith(PYTHIA):
        raise UserError(f"unknown pretrained model {name!r}; choose from {GPT2_SIZES} or {PYTHIA}*")
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(name)
    except Exception as e:  # network, disk, hub errors: one line, with the cause
        raise UserError(f"could not load {name} weights from Hugging Face "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    return from_hf(hf, dropout=dropout)


def from_hf(hf_model, dropout=0.0):
    """A transformers GPT2LMHeadModel or GPTNeoXForCausalLM (of Pythia's shape) as a GPT."""
    c = hf_model.config
    if c.model_type not in HF_CONFIG:
        raise UserError(f"cannot convert a {c.model_type} model: nanoMTP reads GPT-2, GPT-NeoX")
    kw = {ours: getattr(c, theirs) for ours, theirs in HF_CONFIG[c.model_type].items()}
    if c.model_type == 'gpt_neox':
        gelu = {'gelu': 'none', 'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh'}.get(c.hidden_act)
        if c.intermediate_size != 4 * c.hidden_size or gelu is None or c.layer_norm_eps != 1e-5:
            raise UserError("this GPT-NeoX differs from Pythia's shape (intermediate_size = 4 x "
                            "hidden_size, GELU, layer_norm_eps 1e-5): cannot convert it")
        rope = getattr(c, 'rope_parameters', None) or {}  # transformers 5 (4: rotary_pct, ..)
        kw.update(gelu=gelu,
                  rotary_pct=rope.get('partial_rotary_factor', getattr(c, 'rotary_pct', 1.0)),
                  rotary_base=rope.get('rope_theta', getattr(c, 'rotary_emb_base', 10000.0)))
    model = GPT(GPTConfig(**kw, bias=True, dropout=dropout))
    copy_weights(model, hf_model, to_hf=False)
    return model


def to_hf(model):
    """A model's next-token path (an MTPGPT's trunk + head 1) as a transformers model:
    GPTNeoXForCausalLM for a rotary model, else GPT2LMHeadModel. The biases of a bias=False
    model are exported as zeros (the same function); no eos token ends generate() early."""
    transformers, c = import_transformers(), model.config
    if not c.rotary_pct and c.parallel_residual:
        raise UserError("GPT-2 has no parallel residual: cannot export this model")
    kw = {theirs: getattr(c, ours) for ours, theirs
          in HF_CONFIG['gpt_neox' if c.rotary_pct else 'gpt2'].items()}
    kw.update(bos_token_id=None, eos_token_id=None)
    act = {'tanh': 'gelu_new', 'none': 'gelu'}[c.gelu]
    if c.rotary_pct:
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **kw, intermediate_size=4 * c.n_embd, hidden_act=act, rotary_pct=c.rotary_pct,
            rotary_emb_base=c.rotary_base))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw, activation_function=act))
    copy_weights(model, hf, to_hf=True)
    return hf.eval()


HF_CONFIG = {  # GPTConfig fields -> transformers config fields, per architecture (model_type)
    'gpt2': dict(block_size='n_positions', vocab_size='vocab_size', n_layer='n_layer',
                 n_head='n_head', n_embd='n_embd', tie_embeddings='tie_word_embeddings'),
    'gpt_neox': dict(block_size='max_position_embeddings', vocab_size='vocab_size',
                     n_layer='num_hidden_layers', n_head='num_attention_heads',
                     n_embd='hidden_size', parallel_residual='use_parallel_residual',
                     tie_embeddings='tie_word_embeddings')}
# our parameter names -> GPT-NeoX's in transformers (GPT-2's are ours)
NEOX_NAMES = {'transformer.wte.': 'gpt_neox.embed_in.', 'transformer.h.': 'gpt_neox.layers.',
              '.ln_1.': '.input_layernorm.', '.ln_2.': '.post_attention_layernorm.',
              '.attn.c_attn.': '.attention.query_key_value.', '.attn.c_proj.': '.attention.dense.',
              '.mlp.c_fc.': '.mlp.dense_h_to_4h.', '.mlp.c_proj.': '.mlp.dense_4h_to_h.',
              'transformer.ln_f.': 'gpt_neox.final_layer_norm.'}
# HF's GPT-2 uses Conv1D modules: their weights are the transpose of nn.Linear's
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("converting weights needs the optional package transformers: "
                        "pip install transformers")
    return transformers


def copy_weights(model, hf, to_hf):
    """Copy the weights of model's next-token path to (to_hf) or from the transformers model hf.
    Layouts: GPT-2's Conv1D weights are transposed. GPT-NeoX's fused qkv rows are per head,
    [q_h, k_h, v_h] for h = 1..H, while ours are [q (all heads), k, v]: their view
    (H, 3, head_dim, ...) is ours transposed to (3, H, head_dim, ...)."""
    c, rename = model.config, lambda k: k.replace('embed_out.', 'lm_head.')  # (transformers 4)
    ours = {k: v for k, v in model.state_dict().items()
            if not k.startswith(('transformer.h.', 'heads.'))}  # + the next-token path's blocks:
    ours.update({f'transformer.h.{i}.{k}': v for i, block in enumerate(model.ntp_blocks())
                 for k, v in block.state_dict().items()})
    for ours_part, theirs_part in NEOX_NAMES.items() if c.rotary_pct else ():  # their names
        ours = {name.replace(ours_part, theirs_part): w for name, w in ours.items()}
    theirs = {rename(k): v for k, v in hf.state_dict().items()}
    unused = {rename(k) for k, _ in hf.named_parameters()} - set(ours)
    if set(ours) - set(theirs) or unused and not to_hf:  # (to_hf: zero biases)
        raise UserError(f"the weights of this {type(hf).__name__} do not match nanoMTP's")
    with torch.no_grad():
        for p in hf.parameters() if to_hf else ():
            p.zero_()
        for name, w in ours.items():
            src, dst = (w, theirs[name]) if to_hf else (theirs[name], w)
            if name.endswith(CONV1D):  # (GPT-2)
                src = src.t()
            elif '.attention.query_key_value.' in name:  # (GPT-NeoX)
                heads_first = (3, c.n_head) if to_hf else (c.n_head, 3)
                src = src.reshape(*heads_first, -1, *src.shape[1:]).transpose(0, 1).reshape(w.shape)
            dst.copy_(src)
