# Copyright © 2026 mlx-lm-llada contributors.
"""LLaDA 2.x: block diffusion on the Ling-2.0 mixture of experts.

The checkpoint layout is the Hugging Face one of ``inclusionAI/LLaDA2.0-*``
and ``LLaDA2.1-*`` (``model_type: "llada2_moe"``). The layers are mlx-lm's
``bailing_moe`` ones (query/key norms, partial rotary embeddings, a shared
expert, sigmoid routing with an expert bias over groups of experts), with one
change in the router: experts of the groups that are not selected are out of
the running (the reference sets their scores to -inf; ``bailing_moe`` sets
them to 0, which a negative biased score can still beat).

Attention is block-causal: a position attends to its own block and every
block before it, blocks of ``block_length`` aligned to position 0. The mask,
the mask id (from the tokenizer) and the decoding live with the strategy in
``mlx_lm_llada.diffusion``.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
from mlx_lm.models import bailing_moe

from mlx_lm_llada.diffusion import (
    DiffusionModel,
    DiffusionSpec,
    check_config,
    check_geometry,
)

# Special-token ids that the config lacks, read from its tokenizer.
CONFIG_TOKENS = {
    "mask_token_id": "<|mask|>",
    "eos_token_id": "<|endoftext|>",
    "bos_token_id": "<|startoftext|>",
    "eot_token_id": "<|role_end|>",
}

# A chat answer ends at <|role_end|>.
TOKENIZER_DEFAULTS = {"eos_tokens": ["<|role_end|>"]}

# LLaDA 2's generate(): blocks of 32, a token above 0.95 is committed at once,
# else as many as a 32-step schedule asks; finished blocks are kept in a KV
# cache (exact for block-causal attention).
DECODING = {
    "block_length": 32,
    "steps": 32,
    "schedule": "block",
    "threshold": 0.95,
    "threshold_floor": "scheduled",
    "cache": "prefix",
}

_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "vocab_size",
    "mask_token_id",
)

_UNSUPPORTED = {
    # key: (the only value we implement, what the reference does with it)
    "use_sliding_window": (False, "sliding-window attention"),
    "hidden_act": ("silu", "the MLP's activation"),
    "score_function": ("sigmoid", "the router's score function"),
    "moe_shared_expert_intermediate_size": (None, "a shared expert's own width"),
    "norm_head": (False, "a normalised output head"),
}


@dataclass
class ModelArgs(bailing_moe.ModelArgs):
    head_dim: Optional[int] = None
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    diffusion_defaults: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, params):
        check_config("LLaDA 2", params, _REQUIRED, _UNSUPPORTED)
        return super().from_dict(params)

    def __post_init__(self):
        check_geometry(
            self,
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
        width = self.hidden_size // self.num_attention_heads
        if self.head_dim is not None and self.head_dim != width:
            raise ValueError(
                f"LLaDA 2 config head_dim={self.head_dim} differs from "
                f"hidden_size / num_attention_heads ({width}): not supported"
            )
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(
                f"LLaDA 2 config: {self.num_experts} experts cannot form "
                f"n_group={self.n_group} groups of which topk_group="
                f"{self.topk_group} are kept"
            )


class GroupLimitedGate(bailing_moe.BailingMoeGate):
    """The reference's router: sigmoid scores, the expert bias for the choice
    only, the best ``topk_group`` groups (by their two best scores), then the
    top-k experts of those groups, weights renormalised (whatever
    ``norm_topk_prob`` says, as the reference does) and scaled."""

    def __call__(self, x):
        scores = mx.sigmoid(self.gate_proj(x.astype(mx.float32)))
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        if self.n_group > 1:
            choice = mx.unflatten(choice, axis=-1, shape=(self.n_group, -1))
            group_scores = mx.topk(choice, 2, axis=-1).sum(axis=-1, keepdims=True)
            k = self.n_group - self.topk_group
            if k > 0:
                dropped = mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :]
                choice = mx.put_along_axis(
                    choice, dropped, mx.array(-mx.inf, choice.dtype), axis=-2
                )
            choice = mx.flatten(choice, -2, -1)
        inds = mx.argpartition(-choice, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        inds = mx.stop_gradient(inds)
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if self.top_k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return inds, (weights * self.routed_scaling_factor).astype(x.dtype)


class Model(DiffusionModel, bailing_moe.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        for layer in self.layers:
            if isinstance(layer.mlp, bailing_moe.BailingMoeSparseMoeBlock):
                layer.mlp.gate = GroupLimitedGate(args)

    @property
    def diffusion(self):
        """The settings the diffusion sampler needs from this model."""
        # reference=True gives LLaDA 2.0's generate() itself: no cache.
        return DiffusionSpec.from_args(
            self.args,
            defaults=DECODING,
            bos_token_id=self.args.bos_token_id,
            max_sequence_length=self.args.max_position_embeddings,
            family="LLaDA2",
            attention="block_causal",
            reference={"cache": "none"},
        )

    def embed(self, inputs):
        return self.model.word_embeddings(inputs)

    def head(self, h):
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.word_embeddings.as_linear(h)
        return self.lm_head(h)
