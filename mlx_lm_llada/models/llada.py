# Copyright © 2026 mlx-lm-llada contributors.
"""LLaDA: a masked-diffusion language model with a bidirectional transformer.

The checkpoint layout is the Hugging Face one of ``GSAI-ML/LLaDA-8B-*``. The
model never applies a causal mask; generation is the diffusion sampler's job.
"""

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import BaseModelArgs, scaled_dot_product_attention

from mlx_lm_llada.diffusion import (
    DiffusionModel,
    DiffusionSpec,
    check_config,
    check_geometry,
)

# Special-token ids that LLaDA's config lacks, read from its tokenizer.
CONFIG_TOKENS = {"bos_token_id": "<|startoftext|>", "eot_token_id": "<|eot_id|>"}

# An Instruct answer ends at <|eot_id|>, then <|endoftext|> padding.
TOKENIZER_DEFAULTS = {"eos_tokens": ["<|eot_id|>"]}

_UNSUPPORTED = {
    # key: (the only value we implement, what the reference does with it)
    "alibi": (False, "ALiBi attention bias"),
    "rope": (True, "rotary position embeddings"),
    "scale_logits": (False, "logit scaling"),
    "input_emb_norm": (False, "embedding normalisation"),
    "attention_layer_norm": (False, "query/key layer norm"),
    "block_group_size": (1, "grouped blocks"),
}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    mask_token_id: int
    n_kv_heads: Optional[int] = None
    multi_query_attention: Optional[bool] = None
    mlp_hidden_size: Optional[int] = None
    mlp_ratio: int = 4
    embedding_size: Optional[int] = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    max_sequence_length: int = 4096
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    diffusion_defaults: Optional[Dict[str, Any]] = None
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    alibi: bool = False
    rope: bool = True
    scale_logits: bool = False
    input_emb_norm: bool = False
    attention_layer_norm: bool = False
    block_group_size: int = 1

    @classmethod
    def from_dict(cls, params):
        required = [f.name for f in fields(cls) if f.default is f.default_factory]
        check_config("LLaDA", params, required, _UNSUPPORTED)
        return super().from_dict(params)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = 1 if self.multi_query_attention else self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"embedding_size ({self.embedding_size}) is smaller than "
                f"vocab_size ({self.vocab_size})"
            )
        check_geometry(self, "d_model", "n_heads", "n_kv_heads", "embedding_size")
        expected = {
            "block_type": "llama",
            "activation_type": ("silu", "swiglu"),
            "layer_norm_type": ("rms", "default_rms"),
        }
        for key, allowed in expected.items():
            value = getattr(self, key)
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise ValueError(f"LLaDA config {key}={value!r} is not supported")


class Block(nn.Module):
    """One pre-norm block; names follow the checkpoint's (``blocks.{i}.*``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.d_model, args.mlp_hidden_size
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        head_dim = dim // args.n_heads
        self.scale = head_dim**-0.5

        qkv_bias = args.include_bias or args.include_qkv_bias
        self.attn_norm = nn.RMSNorm(dim, eps=args.rms_norm_eps)
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(dim, dim, bias=args.include_bias)
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)

        self.ff_norm = nn.RMSNorm(dim, eps=args.rms_norm_eps)
        self.ff_proj = nn.Linear(dim, hidden, bias=args.include_bias)
        self.up_proj = nn.Linear(dim, hidden, bias=args.include_bias)
        self.ff_out = nn.Linear(hidden, dim, bias=args.include_bias)

    def attention(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        # Positions are absolute: a cache places the window at its offset.
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        out = scaled_dot_product_attention(
            q, k, v, cache=cache, scale=self.scale, mask=mask
        )
        return self.attn_out(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x, mask=None, cache=None):
        h = x + self.attention(self.attn_norm(x), mask, cache)
        n = self.ff_norm(h)
        return h + self.ff_out(swiglu(self.ff_proj(n), self.up_proj(n)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.embedding_size, args.d_model)
        self.blocks = [Block(args) for _ in range(args.n_layers)]
        self.ln_f = nn.RMSNorm(args.d_model, eps=args.rms_norm_eps)
        if not args.weight_tying:
            self.ff_out = nn.Linear(args.d_model, args.embedding_size, bias=False)


class LLaDAModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.transformer = Transformer(args)


class Model(DiffusionModel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LLaDAModel(args)

    def embed(self, inputs):
        return self.model.transformer.wte(inputs)

    def head(self, h):
        t = self.model.transformer
        h = t.ln_f(h)
        if self.args.weight_tying:
            return t.wte.as_linear(h)
        return t.ff_out(h)

    def sanitize(self, weights):
        # Checkpoints of both layouts (HF and mlx-lm's own output) share names.
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.weight_tying:
            weights.pop("model.transformer.ff_out.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.transformer.blocks

    @property
    def diffusion(self):
        """The settings the diffusion sampler needs from this model."""
        # Fast-dLLM's decoding of LLaDA's published Instruct blocks (32);
        # reference=True gives the exact reference schedule.
        return DiffusionSpec.from_args(
            self.args,
            bos_token_id=self.args.bos_token_id,
            max_sequence_length=self.args.max_sequence_length,
        )
