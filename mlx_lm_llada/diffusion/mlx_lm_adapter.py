# Copyright © 2026 mlx-lm-llada contributors.
"""The mlx-lm adapter: a diffusion model's ``generate_step``, so that
``stream_generate``, ``generate``, ``mlx_lm.chat`` and ``mlx_lm.server`` run
the denoising loop and receive its tokens in order."""

from typing import Any, Callable, List, Optional, Union

import mlx.core as mx
import numpy as np

from .caches import BlockPrefixCache, ContextCache, EncoderCache
from .loop import Step, denoise, gap_spans
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
    template: Optional[List[Union[int, List[int]]]] = None,
    **settings,
):
    """mlx-lm's ``generate_step`` contract for a diffusion model.

    Yields ``(token, logprobs)`` in order, each as soon as it and every token
    before it are committed. The canvas is ``max_tokens`` rounded up to whole
    blocks; generation stops early once an end token is committed after a
    complete prefix. ``prompt_cache`` (from ``model.make_cache()``) holds the
    conversation: the prompt is appended to it (without a repeated BOS) and
    each yielded token except EOS is added.

    ``template`` lays out the canvas after the prompt, for fill-in-the-middle:
    gap lengths (ints) and fixed token ids (lists), e.g. ``[32, suffix_ids]``.
    Only the gaps are filled; their tokens are yielded in order, a gap that
    ends early with an end token is skipped past (the end token is yielded
    only in the last gap), and fixed tokens are never yielded.
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
    if template is None:
        block_length = config.block_size(max_tokens)
        gen_length = -(-max_tokens // block_length) * block_length
        if spec.block_causal or spec.noise == "uniform":
            # Blocks aligned to position 0; canvases: whole ones, cut here.
            gen_length = max_tokens
        tail = None
    else:
        tail = template_tail(template, spec.mask_token_id)
        gen_length = len(tail)

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

    # The positions whose tokens are yielded, in order, gap by gap.
    if tail is None:
        gaps = [list(range(P, P + max_tokens))]
    else:
        spans = gap_spans(np.array(tail) == spec.mask_token_id)
        gaps = [[P + i for i in range(a, e)] for a, e in spans]
    end_ids = set(spec.end_token_ids)
    keys = {}
    if context_cache is not None and spec.noise == "uniform":
        # The encoder's causal cache of the conversation, kept across turns.
        if not isinstance(context_cache.keys, EncoderCache):
            context_cache.keys = EncoderCache(model)
        keys = {"encoder_cache": context_cache.keys}
    elif context_cache is not None and spec.block_causal:
        # The keys of the conversation's finished blocks, kept across turns.
        if not isinstance(context_cache.keys, BlockPrefixCache):
            context_cache.keys = BlockPrefixCache(len(model.layers))
        keys = {"blocks_cache": context_cache.keys}
    pending = {}

    def ready(row, final_end):
        """The tokens that are final and next in order."""
        while gaps and gaps[0][0] in pending and gaps[0][0] < final_end:
            pos = gaps[0].pop(0)
            token = int(row[pos])
            logprobs = pending.pop(pos)
            ended = token in end_ids
            if ended and len(gaps) > 1:
                gaps.pop(0)  # the rest of this gap is end padding
                continue
            if not gaps[0]:
                gaps.pop(0)
            if ended:
                gaps.clear()
            yield token, logprobs

    with mx.stream(stream or mx.default_stream(mx.default_device())):
        steps = denoise(
            model,
            mx.array([prompt]),
            gen_length,
            config,
            sampler=sampler,
            early_stop=True,
            spec=spec,
            template=None if tail is None else np.array([prompt + tail]),
            **keys,
        )
        st = None
        for st in steps:
            if on_step is not None:
                on_step(st)
            if st.nfe == 1 and prompt_progress_callback is not None:
                prompt_progress_callback(P, P)
            rows = {int(p): k for k, p in enumerate(st.positions)}
            for pos in st.committed[0]:
                # An edited token's logprobs are those of its last writing.
                pending[int(pos)] = st.logprobs[0, rows[int(pos)]]
            for token, logprobs in ready(st.canvas[0], st.final_end):
                if context_cache is not None:
                    context_cache.tokens.append(token)
                yield token, logprobs
            if not gaps:
                return
        if st is not None:
            # The loop has ended: every token is final.
            for token, logprobs in ready(st.canvas[0], len(st.canvas[0])):
                if context_cache is not None:
                    context_cache.tokens.append(token)
                yield token, logprobs


def template_tail(template, mask_id: int) -> List[int]:
    """The canvas after the prompt from a template of gap lengths (ints) and
    fixed token ids (lists); a gap is a run of mask tokens."""
    if not isinstance(template, (list, tuple)) or not template:
        raise ValueError("template must be a list of gap lengths and token lists")
    tail = []
    for part in template:
        if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
            if part <= 0:
                raise ValueError(f"A gap's length must be positive, got {part}")
            tail += [mask_id] * int(part)
        elif isinstance(part, (list, tuple)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in part
        ):
            if mask_id in part:
                raise ValueError(
                    f"Fixed text contains the mask token ({mask_id}): write a "
                    "gap as a length instead"
                )
            tail += [int(t) for t in part]
        else:
            raise ValueError(
                f"A template part is a gap length (int) or token ids (list), "
                f"got {part!r}"
            )
    if mask_id not in tail:
        raise ValueError("The template has no gap to fill")
    return tail


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
