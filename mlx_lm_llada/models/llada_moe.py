# Copyright © 2026 mlx-lm-llada contributors.
"""LLaDA-MoE: LLaDA's masked diffusion on a Qwen3-MoE-like transformer.

The checkpoint layout is the Hugging Face one of
``inclusionAI/LLaDA-MoE-7B-A1B-*``: its ``config.json`` says
``model_type: "llada"`` like LLaDA-8B and is told apart by its
``architectures: ["LLaDAMoEModelLM"]`` (mlx-lm's
``MODEL_ARCHITECTURE_REMAPPING`` sends it here). The layers are mlx-lm's
Qwen3-MoE ones: RMS norms over each query and key head, full rotary
embeddings, a softmax router whose top-k weights are renormalised only with
``norm_topk_prob``, and the experts in one ``SwitchGLU``. Attention is over
the whole sequence (never causal); the mask id is in the tokenizer only.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_moe
from mlx_lm.models.base import BaseModelArgs

from mlx_lm_llada.diffusion import (
    DecoderLayout,
    DiffusionModel,
    DiffusionSpec,
    check_config,
    check_geometry,
)

# Special-token ids that the config lacks, read from its tokenizer.
CONFIG_TOKENS = {
    "mask_token_id": "<|mask|>",
    "bos_token_id": "<|startoftext|>",
    "eot_token_id": "<|role_end|>",
}

# An Instruct answer ends at <|role_end|>.
TOKENIZER_DEFAULTS = {"eos_tokens": ["<|role_end|>"]}

_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts",
    "num_experts_per_tok",
    "expert_intermediate_size",
    "vocab_size",
    "mask_token_id",
)

_UNSUPPORTED = {
    # key: (the only value we implement, what the reference does with it)
    "attention_bias": (False, "biases of the attention projections"),
    "clip_qkv": (None, "clipping of the queries, keys and values"),
    "qk_layernorm": (True, "query/key RMS norms (without them)"),
    "partial_rotary_factor": (1.0, "partial rotary embeddings"),
    "rope_scaling": (None, "scaled rotary embeddings"),
    "hidden_act": ("silu", "the MLP's activation"),
    "moe_router_score_function": ("softmax", "the router's score function"),
    "moe_router_enable_expert_bias": (False, "the router's expert bias"),
    "routed_scaling_factor": (1, "scaling of the routed experts' output"),
    "shared_expert_intermediate_size": (0, "shared experts"),
}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    vocab_size: int
    mask_token_id: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    dense_intermediate_size: Optional[int] = None
    moe_layer_freq: Union[int, List[int]] = 1
    norm_topk_prob: bool = False
    router_num_group: Optional[int] = None
    router_topk_group: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    diffusion_defaults: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, params):
        check_config("LLaDA-MoE", params, _REQUIRED, _UNSUPPORTED)
        return super().from_dict(params)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_geometry(
            self,
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
        for key in ("router_num_group", "router_topk_group"):
            # The reference's "no grouping" is -2 (or absent); a group count
            # above 1 would restrict the top-k to the best groups.
            value = getattr(self, key)
            if value is not None and value > 1:
                raise ValueError(
                    f"LLaDA-MoE config {key}={value!r} (grouped routing) "
                    "is not supported"
                )
        freq = self.moe_layer_freq
        if isinstance(freq, int) and freq != 1:
            raise ValueError(
                f"LLaDA-MoE config moe_layer_freq={freq!r} (MoE every "
                f"{freq} layers) is not supported; give one flag per layer"
            )
        if isinstance(freq, list) and len(freq) != self.num_hidden_layers:
            raise ValueError(
                f"LLaDA-MoE config moe_layer_freq has {len(freq)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        if self.dense_layers and self.dense_intermediate_size is None:
            raise ValueError(
                "LLaDA-MoE config.json is missing required key(s): "
                "dense_intermediate_size (it has dense layers)"
            )

    @property
    def dense_layers(self) -> List[int]:
        if isinstance(self.moe_layer_freq, int):
            return []
        return [i for i, moe in enumerate(self.moe_layer_freq) if not moe]

    def qwen3_moe_args(self) -> qwen3_moe.ModelArgs:
        """The same layers in the terms of mlx-lm's Qwen3-MoE."""
        return qwen3_moe.ModelArgs(
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.dense_intermediate_size or 0,
            num_attention_heads=self.num_attention_heads,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            decoder_sparse_step=1,
            mlp_only_layers=self.dense_layers,
            moe_intermediate_size=self.expert_intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            vocab_size=self.vocab_size,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            norm_topk_prob=self.norm_topk_prob,
        )


class LLaDAMoEModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        layer_args = args.qwen3_moe_args()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            qwen3_moe.Qwen3MoeDecoderLayer(layer_args, layer_idx=i)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(DecoderLayout, DiffusionModel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LLaDAMoEModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def diffusion(self):
        """The settings the diffusion sampler needs from this model."""
        # LLaDA's sampler; reference=True gives LLaDA's generate.py.
        return DiffusionSpec.from_args(
            self.args,
            bos_token_id=self.args.bos_token_id,
            max_sequence_length=self.args.max_position_embeddings,
            family="LLaDA",
        )

    def sanitize(self, weights):
        weights = super().sanitize(weights)
        # The experts' Linears become one SwitchGLU per layer (as mlx-lm's
        # OLMoE and Qwen-MoE do); a converted checkpoint is stacked already.
        for l in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{l}.mlp"
            for n in ("gate_proj", "up_proj", "down_proj"):
                for k in ("weight", "scales", "biases"):
                    if f"{prefix}.experts.0.{n}.{k}" in weights:
                        weights[f"{prefix}.switch_mlp.{n}.{k}"] = mx.stack(
                            [
                                weights.pop(f"{prefix}.experts.{e}.{n}.{k}")
                                for e in range(self.args.num_experts)
                            ]
                        )
        return weights

    @property
    def quant_predicate(self):
        # The router stays at 8 bits, as in mlx-lm's Qwen3-MoE.
        def predicate(path, _):
            if path.endswith("mlp.gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate
