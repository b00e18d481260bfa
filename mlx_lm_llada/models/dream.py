# Copyright © 2026 mlx-lm-llada contributors.
"""Dream: a masked-diffusion language model on Qwen2.5 weights.

The checkpoint layout is the Hugging Face one of ``Dream-org/Dream-v0-*-7B``,
``apple/DiffuCoder-7B-*`` and ``Dream-org/Dream-Coder-v0-*-7B``: Qwen2's
layers and tensor names, attention over the whole sequence (never causal).
Its logits are shifted: the token at position i is read from the logits at
position i - 1, which the model declares to the diffusion sampler.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from mlx_lm_llada.diffusion import (
    DecoderLayout,
    DiffusionModel,
    DiffusionSpec,
    check_config,
    check_geometry,
)

# Dream's diffusion_generate: the whole canvas at once, the timestep schedule.
REFERENCE_GENERATION = {
    "threshold": None,
    "factor": None,
    "capped_threshold": False,
    "cache": "none",
    "block_length": None,
    "schedule": "timesteps",
}

# An Instruct answer ends at <|im_end|>; its id is not in config.json.
CONFIG_TOKENS = {"eot_token_id": "<|im_end|>"}
# The checkpoints' DreamTokenizer (remote code) is Qwen2's tokenizer.
TOKENIZER_DEFAULTS = {"eos_tokens": ["<|im_end|>"], "tokenizer_type": "qwen2"}

_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "mask_token_id",
)

_UNSUPPORTED = {
    # key: (the only value we implement, what the reference does with it)
    "use_sliding_window": (False, "sliding-window attention"),
    "rope_scaling": (None, "scaled rotary embeddings"),
    "hidden_act": ("silu", "the MLP's activation"),
}


@dataclass
class ModelArgs(qwen2.ModelArgs):
    mask_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    diffusion_defaults: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, params):
        check_config("Dream", params, _REQUIRED, _UNSUPPORTED)
        return super().from_dict(params)

    def __post_init__(self):
        check_geometry(
            self,
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )


class _Placed:
    """A layer's cache for one call: rotary positions per row (a left-padded
    row counts its tokens from 0, as Dream's sampler places them) and the
    canvas cache, if any, for the keys and values."""

    def __init__(self, offset: mx.array, cache=None):
        self.offset = offset
        self.cache = cache

    def update_and_fetch(self, keys, values):
        if self.cache is None:
            return keys, values
        return self.cache.update_and_fetch(keys, values)


class DreamModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            qwen2.TransformerBlock(args) for _ in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(DecoderLayout, DiffusionModel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DreamModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def place(self, cache, attention_mask):
        # A left-padded row's tokens are placed from position 0.
        start = 0 if cache[0] is None else cache[0].offset
        padding = attention_mask.shape[1] - attention_mask.sum(axis=1)
        return [_Placed(start - padding, c) for c in cache]

    @property
    def diffusion(self):
        """The settings the diffusion sampler needs from this model."""
        # Fast-dLLM's Dream decoding (blocks of 32, dual cache, threshold
        # 0.9); reference=True gives Dream's own loop.
        return DiffusionSpec.from_args(
            self.args,
            max_sequence_length=self.args.max_position_embeddings,
            logits_shift=1,
            family="Dream",
            reference=REFERENCE_GENERATION,
        )
