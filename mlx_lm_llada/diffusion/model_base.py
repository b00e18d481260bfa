# Copyright © 2026 mlx-lm-llada contributors.
"""What every masked-diffusion model file shares: mlx-lm's entry points (a
token prompt cache, the model's own generation loop) and the call that the
denoising loop makes."""

from typing import Any, Optional

import mlx.core as mx

from .caches import BlockPrefixCache, ContextCache
from .mlx_lm_adapter import stream_diffusion


class DiffusionModel:
    """A mixin for a model file's ``Model`` (before ``nn.Module``).

    The model implements ``embed(inputs)``, ``layers`` (each called as
    ``layer(h, mask, cache)``), ``head(h)`` (final norm and output head) and
    ``diffusion``; ``place(cache, attention_mask)`` may wrap the layers'
    caches to position a padded batch. This class runs the rest of the call.
    """

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[Any] = None,
        attention_mask: Optional[mx.array] = None,
        logits_positions: Optional[mx.array] = None,
        block_length: Optional[int] = None,
    ) -> mx.array:
        """Logits ``[B, L, V]``, unshifted, with full (bidirectional)
        attention, or block-causal attention in blocks of ``block_length``
        (default: the model's) for a model that declares it.

        ``attention_mask`` ``[B, K]`` marks the keys to attend to (1 keep, 0
        left padding), where ``K`` is the length of the keys (the cache's, if
        any). ``logits_positions`` (input positions) limits the output head
        to those.
        """
        spec = self.diffusion
        if cache is not None and isinstance(cache[0], ContextCache):
            # A token cache (make_cache): run the whole context and return
            # the new positions' logits.
            n = inputs.shape[1]
            context = cache[0].extend(inputs)
            return self(context, block_length=block_length)[:, -n:]
        if cache is None:
            cache = [None] * len(self.layers)
        elif len(cache) != len(self.layers):
            raise ValueError(
                f"{self.diffusion.family} takes one key/value cache per layer "
                f"({len(self.layers)}), got {len(cache)}"
            )
        h = self.embed(inputs)
        mask = None
        if attention_mask is not None:
            mask = key_padding_mask(attention_mask, h.dtype)
            cache = self.place(cache, attention_mask)
        if spec.block_causal:
            offset = 0 if cache[0] is None else cache[0].offset
            block_length = block_length or spec.defaults["block_length"]
            blocks = block_causal_mask(offset, h.shape[1], block_length, h.dtype)
            mask = blocks if mask is None else mask + blocks
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if logits_positions is not None:
            h = h[:, logits_positions]
        return self.head(h)

    def place(self, cache, attention_mask):
        return cache

    def make_cache(self):
        if self.diffusion.block_causal:
            return [ContextCache(keys=BlockPrefixCache(len(self.layers)))]
        return [ContextCache()]

    def generate_step(self, prompt: mx.array, **kwargs):
        return stream_diffusion(self, prompt, **kwargs)


class DecoderLayout:
    """``embed``, ``layers``, ``head`` and ``sanitize`` for the common Hugging
    Face decoder layout (``model.embed_tokens``, ``model.layers``,
    ``model.norm``, ``lm_head`` unless ``tie_word_embeddings``), as Dream's
    and LLaDA-MoE's checkpoints have it. Mix in before ``DiffusionModel``."""

    def embed(self, inputs):
        return self.model.embed_tokens(inputs)

    @property
    def layers(self):
        return self.model.layers

    def head(self, h):
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


def key_padding_mask(attention_mask: mx.array, dtype) -> mx.array:
    """An additive mask ``[B, 1, 1, K]``: padding keys get -inf, for every
    query (a padding query's output is never read)."""
    keep = attention_mask.astype(mx.bool_)[:, None, None, :]
    return mx.where(keep, mx.array(0, dtype), mx.array(-mx.inf, dtype))


def block_causal_mask(offset: int, length: int, block_length: int, dtype):
    """An additive mask ``[L, offset + L]`` for queries at ``offset`` on:
    a position sees its own block and every earlier one (blocks aligned to
    position 0)."""
    queries = (mx.arange(offset, offset + length) // block_length)[:, None]
    keys = (mx.arange(offset + length) // block_length)[None]
    return mx.where(keys <= queries, mx.array(0, dtype), mx.array(-mx.inf, dtype))


def check_config(family: str, params: dict, required, unsupported: dict):
    """Refuse a ``config.json`` that lacks a key the model cannot do without,
    or asks for what it does not implement (``unsupported`` maps a key to the
    one value we implement and what the key is)."""
    missing = [k for k in required if params.get(k) is None]
    if missing:
        raise ValueError(
            f"{family} config.json is missing required key(s): {', '.join(missing)}"
        )
    for key, (value, what) in unsupported.items():
        if params.get(key, value) != value:
            raise ValueError(
                f"{family} config {key}={params[key]!r} ({what}) is not supported"
            )


def check_geometry(args, width: str, heads: str, kv_heads: str, rows: str):
    """Refuse a shape the layers cannot have; the arguments name the fields
    of ``args`` (the model's width, heads, key/value heads, embedding rows)."""
    for whole, part in ((width, heads), (heads, kv_heads)):
        if getattr(args, whole) % getattr(args, part):
            raise ValueError(
                f"{whole} ({getattr(args, whole)}) must be divisible by "
                f"{part} ({getattr(args, part)})"
            )
    if not 0 <= args.mask_token_id < getattr(args, rows):
        raise ValueError(
            f"mask_token_id ({args.mask_token_id}) is outside the "
            f"{getattr(args, rows)} embedding rows"
        )
