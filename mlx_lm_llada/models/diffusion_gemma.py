# Copyright © 2026 mlx-lm-llada contributors.
"""DiffusionGemma: block diffusion on the Gemma 4 mixture of experts.

The checkpoint layout is the Hugging Face one of
``google/diffusiongemma-26B-A4B-it`` (``model_type: "diffusion_gemma"``, the
text stack under ``text_config``). One Gemma 4 MoE stack (mlx-lm's
``gemma4_text`` layers: sliding and full attention, K = V on full layers,
a dense MLP beside the experts) runs in two passes over the same weights,
each with its own per-layer scalar:

- ``encode``: causal, over the prompt and then over every committed canvas,
  appending their keys and values to the cache;
- ``decode``: bidirectional, over a canvas placed right after the cache. It
  reads the cache (on a sliding layer only its last ``sliding_window - 1``
  keys, as the reference's cache holds) and never writes it. Its input
  embedding adds a self-conditioning signal from the previous step's logits.

Text only: the vision tower's weights are dropped, an image is refused. The
denoising loop lives with the strategy in ``mlx_lm_llada.diffusion``.
"""

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_lm_llada.diffusion import (
    ContextCache,
    DiffusionSpec,
    EncoderCache,
    check_config,
    stream_diffusion,
)

FAMILY = "DiffusionGemma"

# The reference's generation defaults (its generation_config.json and
# transformers' built-in ones agree); a canvas is the model's canvas_length.
DECODING = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}

# A chat answer ends at <turn|>.
TOKENIZER_DEFAULTS = {"eos_tokens": ["<turn|>"]}

_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "sliding_window",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)

_UNSUPPORTED = {
    # key: (the only value we implement, what the reference does with it)
    "hidden_activation": ("gelu_pytorch_tanh", "the MLPs' activation"),
    "attention_bias": (False, "biases on the attention projections"),
    "use_bidirectional_attention": ("vision", "a bidirectional encoder"),
    "tie_word_embeddings": (True, "an output head of its own"),
}

# Keys of the outer config that the text model reads (mlx-lm puts
# generation_config.json's end tokens there: the ones generate() stops at).
_OUTER = (
    "canvas_length",
    "image_token_id",
    "boi_token_id",
    "eoi_token_id",
    "eos_token_id",
)


def _layer_types(text):
    # The reference's default: five sliding layers to one full, the last full.
    n = text["num_hidden_layers"]
    types = text.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
    ]
    return types[:-1] + ["full_attention"]


def _full_layer_geometry(text, layer_types):
    """``global_head_dim`` and ``num_global_key_value_heads`` from the full
    layers' ``per_layer_config`` (how transformers writes them), which
    gemma4_text's attention takes as one value for every full layer."""
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        return {
            "global_head_dim": text.get("global_head_dim", 512),
            "num_global_key_value_heads": text.get("num_global_key_value_heads"),
        }
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    overrides = {int(i): dict(v or {}) for i, v in per_layer.items()}
    for i, override in overrides.items():
        unknown = set(override) - {"head_dim", "num_key_value_heads"}
        if unknown or (override and i not in full):
            raise ValueError(
                f"{FAMILY} config per_layer_config[{i}]={override!r} is not "
                "supported (only head_dim and num_key_value_heads of full "
                "attention layers)"
            )
    geometry = {tuple(sorted(overrides.get(i, {}).items())) for i in full}
    if len(geometry) > 1:
        raise ValueError(
            f"{FAMILY} config per_layer_config gives the full attention layers "
            "different shapes: not supported"
        )
    override = dict(geometry.pop()) if geometry else {}
    return {
        "global_head_dim": override.get("head_dim", text["head_dim"]),
        "num_global_key_value_heads": override.get("num_key_value_heads"),
    }


@dataclass
class ModelArgs(gemma4_text.ModelArgs):
    model_type: str = "diffusion_gemma"
    canvas_length: int = 256
    image_token_id: Optional[int] = None
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    diffusion_defaults: Optional[dict] = None
    # What sets DiffusionGemma's stack apart from gemma4_text's defaults.
    hidden_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = True
    attention_k_eq_v: bool = True

    @classmethod
    def from_dict(cls, params):
        text = params.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{FAMILY} config.json has no text_config")
        # The outer config's tie covers the encoder and the output head.
        tie = {"tie_word_embeddings": _UNSUPPORTED["tie_word_embeddings"]}
        check_config(FAMILY, params, (), tie)
        checked = dict(text)
        # None and "vision" are the same for text: a causal encoder.
        checked.setdefault("use_bidirectional_attention", "vision")
        if checked["use_bidirectional_attention"] is None:
            checked["use_bidirectional_attention"] = "vision"
        check_config(FAMILY, checked, _REQUIRED, _UNSUPPORTED)
        sliding = (text.get("rope_parameters") or {}).get("sliding_attention") or {}
        if sliding.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"{FAMILY} config: a partial rotary factor on sliding layers "
                "is not supported"
            )
        layer_types = _layer_types(text)
        flat = {k: v for k, v in text.items() if k != "model_type"}
        flat.update({k: params[k] for k in _OUTER if k in params})
        flat.update(_full_layer_geometry(text, layer_types))
        flat.update(model_type=params["model_type"], layer_types=layer_types)
        return super().from_dict(flat)


class Layer(gemma4_text.DecoderLayer):
    """A gemma4_text MoE layer that both passes run, each scaling its output
    by its own ``layer_scalar`` (the reference's encoder and decoder ones)."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__(args, layer_idx)
        self.layer_scalar = None  # gemma4_text's one scalar; a pair instead
        self.encoder_scalar = mx.ones((1,))
        self.decoder_scalar = mx.ones((1,))

    def __call__(self, x, mask, cache, encoder: bool):
        h, _, _ = super().__call__(x, mask, cache)
        return h * (self.encoder_scalar if encoder else self.decoder_scalar)


class SelfConditioning(gemma4_text.MLP):
    """The decoder's input: ``post_norm(embedding + GeGLU(pre_norm(soft)))``,
    ``soft`` being the embedding of the previous step's distribution."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_norm = gemma4_text.RMSNormNoScale(
            args.hidden_size, eps=args.rms_norm_eps
        )

    def __call__(self, embeddings, soft=None):
        # Without a signal (a canvas's first step) the block adds exactly 0.
        if soft is not None:
            embeddings = embeddings + super().__call__(self.pre_norm(soft))
        return self.post_norm(embeddings)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_scale = args.hidden_size**0.5
        self.layers = [Layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)

    def soft_embedding(self, logits):
        """The embedding table weighted by ``softmax(logits)``, scaled as a
        token's embedding is."""
        embed = self.embed_tokens
        if isinstance(embed, nn.QuantizedEmbedding):
            probs = mx.softmax(logits.astype(mx.float32), axis=-1)
            probs = probs.astype(embed.scales.dtype)
            soft = mx.quantized_matmul(
                probs,
                embed.weight,
                embed.scales,
                embed.biases,
                transpose=False,
                group_size=embed.group_size,
                bits=embed.bits,
                mode=embed.mode,
            )
        else:
            probs = mx.softmax(logits.astype(mx.float32), axis=-1)
            soft = probs.astype(embed.weight.dtype) @ embed.weight
        return soft * self.embed_scale


class _ReadOnly:
    """A layer's cache as the decoder sees it: the encoded prefix (on a
    sliding layer its last ``keep`` keys) before the canvas, never written."""

    def __init__(self, cache, keep: Optional[int] = None):
        self.offset = cache.offset
        self.keys = self.values = None
        if cache.offset == 0:
            return
        if isinstance(cache, RotatingKVCache):
            # A rotating cache written one token at a time is out of order.
            keys = cache._temporal_order(cache.keys)
            values = cache._temporal_order(cache.values)
        else:
            keys, values = cache.keys_and_values()
        if keep is not None and keys.shape[2] > keep:
            keys, values = keys[..., -keep:, :], values[..., -keep:, :]
        self.keys, self.values = keys, values

    @property
    def length(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            return keys, values
        return (
            mx.concatenate([self.keys, keys], axis=2),
            mx.concatenate([self.values, values], axis=2),
        )


def _key_positions(cache, length: int) -> mx.array:
    """The positions of the keys that a layer attends to once ``length`` new
    ones are appended to ``cache`` (mlx-lm's caches return them in temporal
    order; a rotating one keeps ``max_size - 1`` old keys for a chunk)."""
    end = cache.offset + length
    if not isinstance(cache, RotatingKVCache):
        return mx.arange(end)
    if length == 1 and cache.offset >= cache.max_size:
        raise ValueError(
            f"{FAMILY}: a left-padded batch is encoded at least two tokens at "
            "a time once the sliding window is full"
        )
    kept = min(cache.offset, cache.max_size - 1) if length > 1 else cache.offset
    return mx.arange(end - length - kept, end)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)

    @property
    def layers(self):
        return self.model.layers

    def _window(self, layer):
        return self.args.sliding_window if layer.self_attn.is_sliding else None

    @property
    def diffusion(self):
        """The settings the diffusion sampler needs from this model."""
        ends = self.args.eos_token_id
        ends = [] if ends is None else [ends] if isinstance(ends, int) else ends
        return DiffusionSpec(
            mask_token_id=None,
            eos_token_id=ends[0] if ends else None,
            more_end_token_ids=tuple(ends[1:]),
            bos_token_id=self.args.bos_token_id,
            pad_token_id=self.args.pad_token_id,
            max_sequence_length=self.args.max_position_embeddings,
            family=FAMILY,
            noise="uniform",
            vocab_size=self.args.vocab_size,
            defaults={
                **DECODING,
                "block_length": self.args.canvas_length,
                **(self.args.diffusion_defaults or {}),
            },
            reference={},
        )

    def make_cache(self):
        # mlx-lm's prompt cache: the conversation and its encoder cache.
        return [ContextCache(keys=EncoderCache(self))]

    def generate_step(self, prompt: mx.array, **kwargs):
        return stream_diffusion(self, prompt, **kwargs)

    def make_encoder_cache(self):
        """One mlx-lm cache per layer: a rotating one of the sliding window on
        sliding layers (trimmable until it wraps), a growing one on full."""
        return [
            RotatingKVCache(max_size=w) if (w := self._window(l)) else KVCache()
            for l in self.layers
        ]

    def _check_cache(self, cache):
        if cache is None or len(cache) != len(self.layers):
            raise ValueError(
                f"{FAMILY} takes one cache per layer ({len(self.layers)}), "
                "from make_encoder_cache()"
            )
        return cache[0].offset

    def encode(
        self,
        inputs: mx.array,
        cache,
        attention_mask: Optional[mx.array] = None,
    ) -> mx.array:
        """The causal pass: ``inputs`` [B, L] at positions ``offset ..
        offset + L - 1`` (``offset`` the cache's), their keys and values
        appended to ``cache``. ``attention_mask`` [B, offset + L] marks the
        tokens (1) and the left padding (0) of every position so far.
        Returns the final hidden states [B, L, D] (lazy: only the cache is
        needed)."""
        offset = self._check_cache(cache)
        image = self.args.image_token_id
        if offset == 0 and image is not None and (inputs == image).any().item():
            raise ValueError(
                f"{FAMILY} runs text only here: the prompt holds the image "
                f"token (id {image}), and there is no vision tower"
            )
        h = self.model.embed_tokens(inputs) * self.model.embed_scale
        L = inputs.shape[1]
        if attention_mask is not None and attention_mask.shape[1] != offset + L:
            raise ValueError(
                f"{FAMILY}: the encoder's attention_mask covers "
                f"{attention_mask.shape[1]} positions, not {offset + L}"
            )
        for layer, c in zip(self.layers, cache):
            window = self._window(layer)
            if attention_mask is None:
                mask = create_attention_mask(h, c, window_size=window)
            else:
                mask = self._padded_causal_mask(c, L, window, attention_mask)
            h = layer(h, mask, c, encoder=True)
        return self.model.norm(h)

    @staticmethod
    def _padded_causal_mask(cache, length, window, attention_mask):
        keys = _key_positions(cache, length)[None]
        queries = mx.arange(cache.offset, cache.offset + length)[:, None]
        seen = keys <= queries
        if window is not None:
            seen = seen & (keys > queries - window)
        keep = attention_mask.astype(mx.bool_)[:, keys[0]]
        # A padding query sees itself, so that no row is empty (NaN keys).
        mask = (seen[None] & keep[:, None]) | (keys == queries)[None]
        return mask[:, None]

    def decode(
        self,
        canvas: mx.array,
        cache,
        self_conditioning: Optional[mx.array] = None,
        attention_mask: Optional[mx.array] = None,
    ) -> mx.array:
        """The denoiser: float32 logits [B, C, V] (softcapped) of ``canvas``
        [B, C] at positions ``offset .. offset + C - 1``, attending to the
        whole canvas and the cached prefix. ``self_conditioning`` is the
        previous step's (processed) logits [B, C, V], None at a canvas's
        first step. ``attention_mask`` [B, offset] or [B, offset + C] marks
        the prefix's left padding (0). The cache is only read."""
        offset = self._check_cache(cache)
        C = canvas.shape[1]
        h = self.model.embed_tokens(canvas) * self.model.embed_scale
        soft = None
        if self_conditioning is not None:
            soft = self.model.soft_embedding(self_conditioning)
        h = self.model.self_conditioning(h, soft)

        keep = None
        if attention_mask is not None:
            keep = attention_mask.astype(mx.bool_)
            if keep.shape[1] == offset:
                keep = mx.concatenate([keep, mx.ones((keep.shape[0], C), mx.bool_)], 1)
            elif keep.shape[1] != offset + C:
                raise ValueError(
                    f"{FAMILY}: the decoder's attention_mask covers "
                    f"{keep.shape[1]} positions, not {offset} or {offset + C}"
                )
        for layer, c in zip(self.layers, cache):
            window = self._window(layer)
            view = _ReadOnly(c, None if window is None else window - 1)
            mask = None
            if keep is not None:
                mask = keep[:, offset - view.length :][:, None, None, :]
            h = layer(h, mask, view, encoder=False)
        logits = self.model.embed_tokens.as_linear(self.model.norm(h))
        return gemma4_text.logit_softcap(
            self.args.final_logit_softcapping, logits.astype(mx.float32)
        )

    def sanitize(self, weights):
        sanitized = {}
        for k, v in weights.items():
            if k.startswith(
                ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
            ):
                continue
            if k == "lm_head.weight":
                continue  # tied to the embedding
            if k.startswith("model.encoder.language_model."):
                # The encoder's text weights are the decoder's (tied) but for
                # its layer scalars.
                if k.endswith(".layer_scalar"):
                    k = k.replace("encoder.language_model.", "")
                    sanitized[k.replace("layer_scalar", "encoder_scalar")] = v
                continue
            if k.startswith("model.decoder."):
                k = k.replace("model.decoder.", "model.", 1)
                if k.endswith(".layer_scalar"):
                    k = k.replace("layer_scalar", "decoder_scalar")
            sanitized[k] = v
        # gemma4_text's own renaming of the experts (gate_up_proj split).
        return gemma4_text.Model.sanitize(self, sanitized)

    @property
    def quant_predicate(self):
        # As gemma4_text: the router's projection at 8 bits.
        return gemma4_text.Model.quant_predicate.fget(self)
