# Copyright © 2026 mlx-lm-llada contributors.
"""The mlx-lm adapter: a diffusion model's ``generate_step``, so that
``stream_generate``, ``generate``, ``mlx_lm.chat`` and ``mlx_lm.server`` run
the denoising loop and receive its tokens in order."""

from typing import Any, Callable, List, Optional

import mlx.core as mx
import numpy as np

from .caches import ContextCache
from .loop import Step, denoise
from .reference_api import check_length
from .settings import DiffusionSpec, resolve_settings


def stream_diffusion(
    model,
    prompt: mx.array,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    stream=None,
    logits_processors=None,
    input_embeddings=None,
    kv_bits=None,
    max_kv_size=None,
    prefill_step_size=None,
    kv_group_size=None,
    quantized_kv_start=None,
    on_step: Optional[Callable[[Step], None]] = None,
    **settings,
):
    """mlx-lm's ``generate_step`` contract for a diffusion model.

    Yields ``(token, logprobs)`` in order, each as soon as it and every token
    before it are committed. The canvas is ``max_tokens`` rounded up to whole
    blocks; generation stops early once an end token is committed after a
    complete prefix. ``prompt_cache`` (from ``model.make_cache()``) holds the
    conversation: the prompt is appended to it (without a repeated BOS) and
    each yielded token except EOS is added.
    """
    if logits_processors:
        raise ValueError(
            "Logits processors (repetition, presence or frequency penalties, "
            "logit bias) are not supported by the diffusion sampler"
        )
    if input_embeddings is not None:
        raise ValueError("The diffusion sampler does not take input embeddings")
    if kv_bits is not None:
        raise ValueError("KV-cache quantization (kv_bits) does not apply to diffusion")
    if max_kv_size is not None:
        raise ValueError(
            "max_kv_size (a rotating KV cache) does not apply to diffusion"
        )
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(
            f"max_tokens must be positive for a diffusion model (it sizes the "
            f"canvas), got {max_tokens}"
        )
    spec = model.diffusion
    config = resolve_settings(spec, settings)
    config.check_values()
    block_length = config.block_size(max_tokens)
    gen_length = -(-max_tokens // block_length) * block_length

    context_cache = _context_cache(prompt_cache)
    given = [int(t) for t in np.array(prompt).reshape(-1)]
    prompt = given
    if context_cache is not None:
        # The cache keeps what was said, as the caller counts it (the server
        # trims it by its own token counts); the model sees chat.py's context.
        prompt = _conversation(context_cache.tokens + given, spec)
    if not prompt:
        raise ValueError("The prompt is empty: a diffusion model needs a prompt")
    check_length(spec, len(prompt), gen_length)
    if context_cache is not None:
        context_cache.tokens.extend(given)
    P = len(prompt)
    if prompt_progress_callback is not None:
        prompt_progress_callback(0, P)

    end_ids = set(spec.end_token_ids)
    pending = {}
    ptr = 0
    with mx.stream(stream or mx.default_stream(mx.default_device())):
        steps = denoise(
            model,
            mx.array([prompt]),
            gen_length,
            config,
            sampler=sampler,
            early_stop=True,
            spec=spec,
        )
        for st in steps:
            if on_step is not None:
                on_step(st)
            if st.nfe == 1 and prompt_progress_callback is not None:
                prompt_progress_callback(P, P)
            rows = {int(p): k for k, p in enumerate(st.positions)}
            for pos in st.committed[0]:
                pending[int(pos)] = st.logprobs[0, rows[int(pos)]]
            row = st.canvas[0]
            while ptr < max_tokens and P + ptr in pending:
                token = int(row[P + ptr])
                logprobs = pending.pop(P + ptr)
                ptr += 1
                if context_cache is not None:
                    context_cache.tokens.append(token)
                yield token, logprobs
                if token in end_ids or ptr == max_tokens:
                    return


def _conversation(tokens: List[int], spec: DiffusionSpec) -> List[int]:
    """LLaDA ``chat.py``'s context: later turns drop their BOS, EOS is removed."""
    return [
        t
        for i, t in enumerate(tokens)
        if t != spec.eos_token_id and (i == 0 or t != spec.bos_token_id)
    ]


def _context_cache(prompt_cache):
    if prompt_cache is None:
        return None
    if len(prompt_cache) != 1 or not isinstance(prompt_cache[0], ContextCache):
        raise ValueError(
            "A diffusion model's prompt cache is the one model.make_cache() "
            "returns (a ContextCache of the conversation's tokens)"
        )
    return prompt_cache[0]
