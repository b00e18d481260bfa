# Copyright © 2026 mlx-lm-llada contributors.
"""The one denoising loop, for every masked-diffusion model.

:func:`denoise` serves LLaDA's reference schedule (``generate.py``), Dream's
(``diffusion_generate``), Fast-dLLM's prefix and dual caches, its threshold
and factor rules for parallel decoding, and early stop: they are settings
(:class:`~.settings.DiffusionSettings`) and traits the model declares
(:class:`~.settings.DiffusionSpec`).

The loop knows nothing of a model's internals. It needs

- ``model(tokens, cache=None, attention_mask=None, logits_positions=None)``,
  returning logits ``[B, L, V]`` with bidirectional attention, where a cache
  is a list of per-layer :class:`~.caches.CanvasCache` and
  ``logits_positions`` limits the output head to some input positions;
- ``model.layers`` (one cache per layer);
- ``model.diffusion``, a :class:`~.settings.DiffusionSpec`.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import numpy as np

from .caches import CanvasCache
from .commit_rules import (
    confidence,
    even_counts,
    select,
    select_random,
    timestep_count,
    timesteps,
    transfer_probability,
)
from .settings import DiffusionSettings, DiffusionSpec


@dataclass
class Step:
    """The state after one model call (what ``on_step`` receives)."""

    block: int
    step: int  # within the block
    canvas: np.ndarray  # [B, P + gen_length], live: copy it to keep it
    committed: List[np.ndarray]  # per row: canvas positions committed now
    confidence: List[np.ndarray]  # per row: their confidences
    positions: np.ndarray  # canvas positions that the logprobs rows are for
    logprobs: mx.array  # [B, len(positions), V] of this call
    nfe: int
    done: bool = False  # early stop: an end token closed every row
    block_start: int = 0  # canvas position where this block begins
    block_length: int = 0


class _Counts:
    """How many tokens each row commits at each step of one block."""

    def __init__(self, settings: DiffusionSettings, steps: int, rows: int):
        self.settings = settings
        self.steps = steps
        self.even = None  # per row, fixed when the block's first count is asked
        self.first = 0
        self.ts = timesteps(steps, settings.eps)
        self.carry = np.zeros(rows, dtype=np.int64)

    def __call__(self, row: int, step: int, masked: int) -> int:
        s = self.settings
        if s.schedule == "timesteps" and not s.capped_threshold:
            return timestep_count(masked, step, self.ts) if step < self.steps else 1
        if self.even is None:
            self.even, self.first = {}, step
        if row not in self.even:
            self.even[row] = even_counts(masked, max(self.steps - step, 1))
        i = step - self.first
        scheduled = self.even[row][i] if i < len(self.even[row]) else 0
        if s.capped_threshold:
            return scheduled + int(self.carry[row])
        return scheduled if i < len(self.even[row]) else 1


def denoise(
    model,
    prompt: mx.array,
    gen_length: int,
    settings: DiffusionSettings,
    attention_mask: Optional[mx.array] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    early_stop: bool = False,
    spec: Optional[DiffusionSpec] = None,
    template: Optional[np.ndarray] = None,
) -> Iterator[Step]:
    """Fill ``gen_length`` masks after ``prompt`` [B, P]; yield after each call.

    The canvas is filled block by block, left to right (one block: the whole
    canvas at once). Each step runs the model, proposes a token for each
    masked position (the ``sampler``'s choice; argmax by default), and
    commits some of them (:mod:`.commit_rules`). Committed tokens are never
    masked again. Masks inside the prompt are filled too, as the references
    do, when every call sees the whole sequence (no cache).

    ``template`` [B, P + gen_length], if given, is the canvas to start from:
    its masks are the gaps to fill, its other tokens stay as they are (the
    blocks are laid from P as usual; the last one may be shorter).
    """
    spec = spec or model.diffusion
    settings.check(gen_length, whole_blocks=template is None)
    mask_id = spec.mask_token_id
    shift = spec.logits_shift
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    B, P = prompt.shape
    T = P + gen_length
    block_length = settings.block_size(gen_length)
    steps_per_block = settings.steps_per_block(gen_length)
    fixed = settings.fixed_count
    eos = spec.eos_token_id
    end_ids = np.array(spec.end_token_ids, dtype=np.int64)
    zero_conf_ids = list(spec.end_token_ids) if settings.confidence_eos_eot_inf else []

    if template is None:
        x = np.full((B, T), mask_id, dtype=np.int64)
        x[:, :P] = np.array(prompt, dtype=np.int64)
    else:
        x = np.array(template, dtype=np.int64).reshape(B, T)
    # What classifier-free guidance hides: every token that is not a gap.
    prompt_index = x != mask_id
    gaps = [gap_spans(row[P:] == mask_id) for row in x]
    if attention_mask is not None:
        attention_mask = mx.concatenate(
            [attention_mask, mx.ones((B, gen_length), attention_mask.dtype)], axis=1
        )
    cfg = settings.cfg_scale > 0
    if cfg and attention_mask is not None:
        attention_mask = mx.concatenate([attention_mask, attention_mask])
    caches = None
    if settings.cache != "none":
        caches = [CanvasCache() for _ in model.layers]

    def run_model(start, end, positions):
        tokens = x[:, start:end]
        if cfg:
            # The unconditional half sees the prompt as masks.
            uncond = np.where(prompt_index[:, start:end], mask_id, tokens)
            tokens = np.concatenate([tokens, uncond])
        if caches is not None:
            for c in caches:
                c.offset = start
        # A shifted model reads position i's token from position i - 1's
        # logits (position 0 from its own).
        rows = np.maximum(positions - shift, 0) - start
        logits = model(
            mx.array(tokens),
            cache=caches,
            attention_mask=attention_mask,
            logits_positions=mx.array(rows),
        ).astype(mx.float32)
        if cfg:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + (settings.cfg_scale + 1) * (cond - uncond)
        return logits

    nfe = 0
    finished = False
    for b in range(settings.blocks(gen_length)):
        bs = P + b * block_length
        be = min(bs + block_length, T)
        # Without a cache every call sees the whole sequence, so masks left
        # of the block (in the prompt) are candidates too.
        lo = 0 if caches is None else bs
        counts = _Counts(settings, steps_per_block, B)
        step = 0
        while (x[:, lo:be] == mask_id).any():
            masked = x[:, lo:be] == mask_id
            # A shifted model's block start is predicted from outside the
            # window of a cached call: the first call, over the whole canvas,
            # commits it, and only it (Fast-dLLM's Dream loop).
            first_only = shift > 0 and caches is not None and step == 0
            k = None
            if first_only:
                masked = np.zeros_like(masked)
                masked[:, 0] = x[:, bs] == mask_id
            elif fixed or settings.capped_threshold:
                k = [counts(j, step, int(masked[j].sum())) for j in range(B)]
                if not any(k):
                    # A step that would commit nothing changes nothing: its
                    # model call is skipped (the reference makes it).
                    step += 1
                    continue
            positions = lo + np.flatnonzero(masked.any(axis=0))
            if not len(positions):
                # A fixed block start: the first call only refreshes the cache.
                positions = np.array([bs])
            # The first call of a block (or every call, without a cache) runs
            # the whole canvas; cached calls run what the mode needs.
            if caches is None or step == 0:
                logits = run_model(0, T, positions)
            elif settings.cache == "prefix":
                logits = run_model(bs, T, positions)
            else:
                logits = run_model(bs, be, positions)
            nfe += 1

            if settings.logits_eos_inf and eos is not None:
                logits[..., eos] = -mx.inf
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            K, V = logprobs.shape[1:]
            # A proposed mask token would stay masked: the loop would run past
            # its steps (forever at temperature 0), so it is never a candidate.
            candidates = mx.array(logprobs)
            candidates[..., mask_id] = -mx.inf
            x0 = sampler(candidates.reshape(-1, V)).reshape(B, K)
            conf = confidence(settings.remasking, logits, x0, zero_conf_ids)
            mx.eval(x0, conf, logprobs)
            width = be - lo
            x0_np = np.zeros((B, width), dtype=np.int64)
            x0_np[:, positions - lo] = np.array(x0, dtype=np.int64)
            conf_np = np.full((B, width), -np.inf)
            conf_np[:, positions - lo] = np.array(conf, dtype=np.float64)

            committed, confidences = [], []
            for j in range(B):
                if first_only:
                    idx = np.flatnonzero(masked[j])
                elif settings.remasking == "origin":
                    p = transfer_probability(step, counts.ts)
                    idx = select_random(masked[j], p)
                else:
                    idx = select(
                        conf_np[j],
                        masked[j],
                        None if k is None else k[j],
                        settings.threshold,
                        settings.factor,
                        settings.alg_temp,
                    )
                    if settings.capped_threshold:
                        counts.carry[j] = k[j] - len(idx)
                x[j, lo + idx] = x0_np[j, idx]
                committed.append(lo + idx)
                confidences.append(conf_np[j, idx])
            step += 1

            if early_stop and len(end_ids):
                # Early: masks are left in the gaps, none in the prompt.
                finished = bool(
                    (x[:, P:] == mask_id).any()
                    and not (x[:, :P] == mask_id).any()
                    and all(
                        _ended(row[P:][a:e], mask_id, end_ids)
                        for row, spans in zip(x, gaps)
                        for a, e in spans
                    )
                )
                if finished:
                    # The rest of each gap is the end padding.
                    gen = x[:, P:]
                    gen[gen == mask_id] = eos if eos is not None else end_ids[0]
            yield Step(
                b,
                step - 1,
                x,
                committed,
                confidences,
                positions,
                logprobs,
                nfe,
                finished,
                block_start=bs,
                block_length=block_length,
            )
            if finished:
                return


def _ended(gen: np.ndarray, mask_id: int, end_ids: np.ndarray) -> bool:
    """True once ``gen`` (one gap) is filled, or an end token is committed
    with everything before it."""
    masks = np.flatnonzero(gen == mask_id)
    if not len(masks):
        return True
    return bool(np.isin(gen[: masks[0]], end_ids).any())


def gap_spans(masked: np.ndarray) -> List[tuple]:
    """The runs of masks: ``(start, end)`` of each gap."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], masked, [0]]).astype(int)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
