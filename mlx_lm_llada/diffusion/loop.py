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

from .caches import BlockPrefixCache, CanvasCache, EncoderCache
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
    committed: List[np.ndarray]  # per row: canvas positions written now
    confidence: List[np.ndarray]  # per row: their confidences
    positions: np.ndarray  # canvas positions that the logprobs rows are for
    logprobs: mx.array  # [B, len(positions), V] of this call
    nfe: int
    done: bool = False  # early stop: an end token closed every row
    block_start: int = 0  # canvas position where this block begins
    block_length: int = 0
    # Tokens before this canvas position are final (with token editing, a
    # block's tokens are final once the block ends).
    final_end: int = 0
    tokens_in: int = 0  # positions the model call processed
    prompt_length: int = 0


class _Counts:
    """How many tokens each row commits at each step of one block."""

    def __init__(self, settings: DiffusionSettings, steps: int, rows: int, width: int):
        self.settings = settings
        self.steps = steps
        self.width = width
        self.even = None  # per row, fixed when the block's first count is asked
        self.first = 0
        self.ts = timesteps(steps, settings.eps)
        self.carry = np.zeros(rows, dtype=np.int64)

    def __call__(self, row: int, step: int, masked: int) -> int:
        s = self.settings
        if s.num_to_transfer is not None:
            return s.num_to_transfer
        if s.schedule == "block":
            counts = even_counts(self.width, self.steps)
            return counts[step] if step < self.steps else 1
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


def block_spans(
    spec: DiffusionSpec, settings: DiffusionSettings, P: int, gen_length: int
):
    """The canvas length and the ``(start, end)`` of each block to denoise.

    Blocks start at the prompt's end, the last one possibly shorter, or, for
    a block-causal model, are aligned to position 0: the prompt's tail
    shares the first block, and the canvas ends on a block edge (positions
    past ``P + gen_length`` are denoised too and dropped, as LLaDA 2 does).
    """
    bl = settings.block_size(gen_length)
    if spec.block_causal:
        T = -(-(P + gen_length) // bl) * bl
        return T, [(b * bl, b * bl + bl) for b in range(P // bl, T // bl)]
    T = P + gen_length
    return T, [(s, min(s + bl, T)) for s in range(P, T, bl)]


def check_for_model(settings: DiffusionSettings, spec: DiffusionSpec):
    """Refuse settings that cannot work with how the model attends."""
    if not spec.block_causal:
        return
    name = spec.family
    if settings.block_length is None:
        raise ValueError(
            f"{name} attends block-causally: block_length must be set (its "
            "blocks are the attention's)"
        )
    if settings.cache == "dual":
        raise ValueError(
            f"cache='dual' keeps the canvas after the block, which a "
            f"block-causal model ({name}) never reads: use cache='prefix' (an "
            "exact cache of the finished blocks) or 'none'"
        )
    if settings.cfg_scale > 0:
        raise ValueError(
            f"cfg_scale (classifier-free guidance) is not supported for {name}"
        )
    if settings.suffix_length is not None:
        raise ValueError(
            f"suffix_length drops the canvas past the block, which {name} "
            "never reads (it attends block-causally): leave it unset"
        )


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
    blocks_cache: Optional[BlockPrefixCache] = None,
    noise: Optional[Callable[[int, tuple], mx.array]] = None,
    encoder_cache: Optional[EncoderCache] = None,
) -> Iterator[Step]:
    """Fill ``gen_length`` masks after ``prompt`` [B, P]; yield after each call.

    A uniform-noise model (``spec.noise``) is denoised by
    :func:`denoise_uniform` (``noise`` and ``encoder_cache`` are its).

    The canvas is filled block by block, left to right (one block: the whole
    canvas at once). Each step runs the model, proposes a token for each
    masked position (the ``sampler``'s choice; argmax by default), and
    commits some of them (:mod:`.commit_rules`). Committed tokens are never
    masked again (token editing may rewrite them while their block runs).
    Masks inside the prompt are filled too, as the references do, when every
    call sees the whole sequence (no cache).

    ``template`` [B, P + gen_length], if given, is the canvas to start from:
    its masks are the gaps to fill, its other tokens stay as they are (the
    blocks are laid from P as usual; the last one may be shorter).

    A block-causal model reads no further than the current block. Without a
    cache each call runs everything up to the block's end; with
    ``cache="prefix"`` the finished blocks' keys are kept
    (:class:`~.caches.BlockPrefixCache`, ``blocks_cache`` to reuse one) and
    a call runs the blocks that are not stored yet: the current block, and
    after a block ends, that block once more to store it.
    """
    spec = spec or model.diffusion
    if spec.noise == "uniform":
        if template is not None:
            raise ValueError(
                f"Fill-in-the-middle is not supported for {spec.family} "
                "(uniform noise: no mask marks a gap)"
            )
        yield from denoise_uniform(
            model,
            prompt,
            gen_length,
            settings,
            attention_mask=attention_mask,
            sampler=sampler,
            spec=spec,
            noise=noise,
            encoder_cache=encoder_cache,
        )
        return
    if noise is not None or encoder_cache is not None:
        raise ValueError("noise and encoder_cache are for uniform-noise models")
    block_causal = spec.block_causal
    settings.check(gen_length, whole_blocks=template is None and not block_causal)
    check_for_model(settings, spec)
    if settings.suffix_length is not None and template is not None:
        raise ValueError(
            "suffix_length drops the canvas past the current block: "
            "fill-in-the-middle needs the text after the gap"
        )
    if block_causal and template is not None:
        raise ValueError(
            f"Fill-in-the-middle needs a model that reads the text after a gap; "
            f"{spec.family} attends block-causally (never past its block)"
        )
    if (
        block_causal
        and attention_mask is not None
        and not np.array(attention_mask).all()
    ):
        raise ValueError(
            f"{spec.family} aligns its blocks to position 0: a left-padded batch "
            "would shift them; generate one prompt at a time"
        )
    mask_id = spec.mask_token_id
    shift = spec.logits_shift
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    B, P = prompt.shape
    G = P + gen_length  # the canvas that is returned
    T, spans = block_spans(spec, settings, P, gen_length)
    block_length = settings.block_size(gen_length)
    steps_per_block = settings.steps_per_block(gen_length)
    fixed = settings.fixed_count
    scheduled = (
        fixed or settings.capped_threshold or settings.threshold_floor == "scheduled"
    )
    editing = settings.editing_threshold
    tail = settings.dual_window == "tail"
    eos = spec.eos_token_id
    end_ids = np.array(spec.end_token_ids, dtype=np.int64)
    zero_conf_ids = list(spec.end_token_ids) if settings.confidence_eos_eot_inf else []

    if template is None:
        x = np.full((B, T), mask_id, dtype=np.int64)
        x[:, :P] = np.array(prompt, dtype=np.int64)
    else:
        x = np.array(template, dtype=np.int64).reshape(B, T)
    canvas = x[:, :G]
    # What classifier-free guidance hides and editing keeps: every token
    # that is not a gap.
    prompt_index = x != mask_id
    gaps = [gap_spans(row[P:] == mask_id) for row in canvas]
    if attention_mask is not None and not block_causal:
        attention_mask = mx.concatenate(
            [attention_mask, mx.ones((B, gen_length), attention_mask.dtype)], axis=1
        )
    else:
        attention_mask = None
    cfg = settings.cfg_scale > 0
    if cfg and attention_mask is not None:
        attention_mask = mx.concatenate([attention_mask, attention_mask])
    caches = stored = None
    if settings.cache != "none" and block_causal:
        stored = blocks_cache if blocks_cache is not None and B == 1 else None
        stored = stored or BlockPrefixCache(len(model.layers))
        stored.reuse(x[0, :P], block_length, limit=spans[0][0])
        caches = stored.layers
    elif settings.cache != "none":
        caches = [CanvasCache() for _ in model.layers]

    def run_model(start, end, positions, keys_end):
        tokens = x[:, start:end]
        mask = attention_mask
        if mask is not None and not block_causal:
            mask = mask[:, :keys_end]
        if cfg:
            # The unconditional half sees the prompt as masks.
            uncond = np.where(prompt_index[:, start:end], mask_id, tokens)
            tokens = np.concatenate([tokens, uncond])
        if caches is not None and not block_causal:
            for c in caches:
                c.offset = start
        # A shifted model reads position i's token from position i - 1's
        # logits (position 0 from its own).
        rows = np.maximum(positions - shift, 0) - start
        extra = {"block_length": block_length} if block_causal else {}
        logits = model(
            mx.array(tokens),
            cache=caches,
            attention_mask=mask,
            logits_positions=mx.array(rows),
            **extra,
        ).astype(mx.float32)
        if cfg:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + (settings.cfg_scale + 1) * (cond - uncond)
        return logits

    nfe = 0
    finished = False
    for b, (bs, be) in enumerate(spans):
        # Without a cache every call sees the whole sequence, so masks left
        # of the block (in the prompt) are candidates too.
        lo = 0 if caches is None and not block_causal else bs
        width = be - lo
        # Suffix dropout: calls see the canvas up to `seen`; the masks past
        # it are not computed, attended or cached.
        seen = (
            T if settings.suffix_length is None else min(T, be + settings.suffix_length)
        )
        # dual_window="tail": where the next dual-cache call starts.
        refresh_from = bs
        counts = _Counts(settings, steps_per_block, B, be - bs)
        # Editing can write masks back; a model that does so at every step
        # never fills the block (the reference's loop never ends). Past this
        # many steps the block is only filled: twice the most that a golden
        # block took, (max_post_steps + 1) x (block length + 1).
        edit_limit = 2 * (settings.max_post_steps + 1) * (be - bs + 1)
        step = 0
        # Rows whose block is still running, and (editing) their post-steps.
        active = np.ones(B, dtype=bool)
        post = np.zeros(B, dtype=np.int64)
        while True:
            masked = x[:, lo:be] == mask_id
            filled = ~masked.any(axis=1)
            if editing is None:
                active &= ~filled
            else:
                # A full block is edited for up to max_post_steps more steps.
                post += active & filled
                active &= post <= settings.max_post_steps
            if not active.any():
                break
            masked &= active[:, None]
            # A shifted model's block start is predicted from outside the
            # window of a cached call: the first call, over the whole canvas,
            # commits it, and only it (Fast-dLLM's Dream loop).
            first_only = shift > 0 and caches is not None and step == 0
            k = None
            if first_only:
                masked = np.zeros_like(masked)
                masked[:, 0] = x[:, bs] == mask_id
            elif scheduled:
                k = [counts(j, step, int(masked[j].sum())) for j in range(B)]
                if fixed and editing is None and not any(k):
                    # A step that would commit nothing changes nothing: its
                    # model call is skipped (the reference makes it).
                    step += 1
                    continue
            if editing is not None:
                positions = np.arange(lo, be)  # edits need every position
            else:
                positions = lo + np.flatnonzero(masked.any(axis=0))
            if not len(positions):
                # A fixed block start: the first call only refreshes the cache.
                positions = np.array([bs])
            if block_causal:
                start = 0 if stored is None else stored.offset
                logits = run_model(start, be, positions, be)
                tokens_in = be - start
                if stored is not None:
                    # Everything before the block is final: store it.
                    stored.keep(bs, x[0, :bs])
            # The first call of a block (or every call, without a cache) runs
            # the canvas up to `seen`; cached calls run what the mode needs.
            elif caches is None or step == 0:
                logits, tokens_in = run_model(0, seen, positions, seen), seen
            elif settings.cache == "prefix":
                logits = run_model(bs, seen, positions, seen)
                tokens_in = seen - bs
            else:
                # A shifted model reads the first position from the one before.
                start = max(bs, refresh_from - shift) if tail else bs
                logits, tokens_in = run_model(start, be, positions, seen), be - start
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
            edit_to = chosen = x0
            if editing is not None:
                # An edit may propose the mask itself (LLaDA 2.1 then fills
                # that position again); a commit never does.
                edit_to = sampler(logprobs.reshape(-1, V)).reshape(B, K)
                x0 = mx.where(edit_to == mask_id, x0, edit_to)
                chosen = mx.take_along_axis(logprobs, edit_to[..., None], axis=-1)
                chosen = mx.exp(chosen[..., 0])
            conf = confidence(
                settings.remasking, logits, x0, zero_conf_ids, logprobs=logprobs
            )
            mx.eval(x0, conf, logprobs, edit_to, chosen)
            x0_np = np.zeros((B, width), dtype=np.int64)
            x0_np[:, positions - lo] = np.array(x0, dtype=np.int64)
            edit_np = np.array(edit_to, dtype=np.int64)
            conf_np = np.full((B, width), -np.inf)
            conf_np[:, positions - lo] = np.array(conf, dtype=np.float64)

            committed, confidences = [], []
            for j in range(B):
                if not active[j]:
                    committed.append(np.zeros(0, dtype=np.int64))
                    confidences.append(np.zeros(0))
                    continue
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
                        settings.threshold_floor,
                    )
                    if settings.capped_threshold:
                        counts.carry[j] = k[j] - len(idx)
                if editing is not None:
                    # Token editing (LLaDA 2.1): a generated token whose
                    # proposal differs and is surer than editing_threshold.
                    p = np.array(chosen[j], dtype=np.float64)
                    edits = np.flatnonzero(
                        ~masked[j]
                        & ~prompt_index[j, lo:be]
                        & (p > editing)
                        & (edit_np[j] != x[j, lo:be])
                    )
                    if step >= edit_limit:
                        edits = edits[:0]
                    if filled[j] and not len(edits):
                        active[j] = False  # nothing left to change
                    x[j, lo + edits] = edit_np[j, edits]
                    x[j, lo + idx] = x0_np[j, idx]
                    idx = np.union1d(idx, edits)
                else:
                    x[j, lo + idx] = x0_np[j, idx]
                committed.append(lo + idx)
                confidences.append(conf_np[j, idx])
            step += 1
            if tail:
                # Keys to refresh: the masks, and what was just committed
                # (computed as masks); the tokens before them keep theirs.
                left = np.flatnonzero((x[:, bs:be] == mask_id).any(axis=0))
                starts = [bs + int(left[0]) if len(left) else be]
                refresh_from = min(starts + [int(c.min()) for c in committed if len(c)])

            # With editing a block's tokens may still change: its end is
            # decided when the block ends.
            if early_stop and len(end_ids) and editing is None:
                finished = _finish(canvas, P, gaps, mask_id, end_ids, eos)
            if be > G:
                # The last block of a block-causal model runs past the canvas
                # that is returned: report only what is in it.
                shown = positions < G
                logprobs = logprobs[:, mx.array(np.flatnonzero(shown))]
                positions = positions[shown]
                confidences = [c[i < G] for c, i in zip(confidences, committed)]
                committed = [i[i < G] for i in committed]
            yield Step(
                b,
                step - 1,
                canvas,
                committed,
                confidences,
                positions,
                logprobs,
                nfe,
                finished,
                block_start=bs,
                block_length=block_length,
                final_end=G if editing is None else bs,
                tokens_in=tokens_in,
                prompt_length=P,
            )
            if finished:
                return
        if early_stop and len(end_ids) and editing is not None:
            if _finish(canvas, P, gaps, mask_id, end_ids, eos):
                return


def _finish(canvas, P, gaps, mask_id, end_ids, eos) -> bool:
    """Early stop: True once every gap of every row has ended (the rest of
    each gap is then filled with EOS), with no mask left in the prompt."""
    done = bool(
        (canvas[:, P:] == mask_id).any()
        and not (canvas[:, :P] == mask_id).any()
        and all(
            _ended(row[P:][a:e], mask_id, end_ids)
            for row, spans in zip(canvas, gaps)
            for a, e in spans
        )
    )
    if done:
        gen = canvas[:, P:]
        gen[gen == mask_id] = eos if eos is not None else end_ids[0]
    return done


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


def denoise_uniform(
    model,
    prompt: mx.array,
    gen_length: int,
    settings: DiffusionSettings,
    attention_mask: Optional[mx.array] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    spec: Optional[DiffusionSpec] = None,
    noise: Optional[Callable[[int, tuple], mx.array]] = None,
    encoder_cache: Optional[EncoderCache] = None,
) -> Iterator[Step]:
    """Uniform-noise diffusion (DiffusionGemma), canvas by canvas.

    Why not :func:`denoise`'s body: there a committed token is final and a
    block ends when no mask is left; here every position is proposed again
    at every step, the canvas is read out (its argmax) when it is stable and
    confident, and the next canvas reads it from a causal cache that an
    encoder pass writes. What is shared: the settings, :class:`Step`, the
    streaming adapter, the views and mlx-lm's own KV caches.

    The model implements ``encode(tokens, cache, attention_mask)`` (causal,
    writes the cache) and ``decode(canvas, cache, self_conditioning,
    attention_mask)`` (bidirectional over the cache and the canvas, reads
    it only; returns logits). ``noise(k, shape)`` gives the k-th draw of
    token ids (default: MLX's generator); ``sampler(logprobs)`` picks the
    proposals from the tempered log-probabilities (default: a draw from
    them, as the reference's multinomial).
    """
    spec = spec or model.diffusion
    settings.check_values()
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    B, P = prompt.shape
    C = settings.block_size(gen_length)
    V = spec.vocab_size
    N = settings.max_denoising_steps
    canvases = -(-gen_length // C)
    if noise is None:
        noise = lambda k, shape: mx.random.randint(0, V, shape)  # noqa: E731
    if sampler is None:
        sampler = lambda lp: mx.random.categorical(lp)  # noqa: E731
    end_ids = np.array(spec.end_token_ids, dtype=np.int64)
    pad = spec.pad_token_id

    if encoder_cache is None or B != 1:
        encoder_cache = EncoderCache(model)
    keys = attention_mask
    if keys is None:
        keys = mx.ones((B, P), dtype=mx.int32)
    start = encoder_cache.reuse(np.array(prompt)[0].tolist()) if B == 1 else 0
    model.encode(prompt[:, start:], encoder_cache.layers, attention_mask=keys)
    encoder_cache.tokens = np.array(prompt)[0].tolist() if B == 1 else []

    x = np.zeros((B, P + canvases * C), dtype=np.int64)
    x[:, :P] = np.array(prompt)
    finished_rows = np.zeros(B, dtype=bool)
    draws = 0
    nfe = 0
    for c in range(canvases):
        lo, hi = P + c * C, P + (c + 1) * C
        if c > 0:
            # The committed canvas (pads included) joins the causal cache.
            model.encode(mx.array(x[:, lo - C : lo]), encoder_cache.layers, keys)
            if B == 1:
                encoder_cache.tokens += x[0, lo - C : lo].tolist()
        keys = mx.concatenate([keys, mx.ones((B, C), keys.dtype)], axis=1)
        canvas = mx.array(noise(draws, (B, C)))
        draws += 1
        argmax = canvas
        self_conditioning = None
        history = None
        done = np.zeros(B, dtype=bool)
        for s in range(N, 0, -1):
            logits = model.decode(canvas, encoder_cache.layers, self_conditioning, keys)
            t = settings.t_min + (settings.t_max - settings.t_min) * s / N
            processed = logits.astype(mx.float32) / t
            logprobs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
            proposal = sampler(logprobs.reshape(-1, V)).reshape(B, C)
            new_argmax = mx.argmax(processed, axis=-1)
            entropy = -mx.sum(mx.exp(logprobs) * logprobs, axis=-1)
            accepted = entropy_bound_accept(entropy, settings.entropy_bound)
            renoise = mx.array(noise(draws, (B, C)))
            draws += 1
            new_canvas = mx.where(accepted, proposal, renoise)
            nfe += 1
            if done.any():
                # A row that has stopped keeps its canvas and logits.
                keep = mx.array(done)
                new_argmax = mx.where(keep[:, None], argmax, new_argmax)
                new_canvas = mx.where(keep[:, None], canvas, new_canvas)
                processed = mx.where(keep[:, None, None], self_conditioning, processed)
            # Stop: the argmax canvas equals the last stability_threshold ones,
            # and the mean entropy is below confidence_threshold.
            a = np.array(new_argmax, dtype=np.int64)
            if settings.stability_threshold == 0:
                stable = np.ones(B, dtype=bool)
            else:
                if history is None:
                    history = np.full((settings.stability_threshold, B, C), -1)
                stable = (history == a[None]).all(axis=(0, 2))
                history = np.concatenate([history[1:], a[None]])
            confident = np.array(entropy.mean(axis=-1)) < settings.confidence_threshold
            done |= stable & confident
            argmax, canvas = new_argmax, new_canvas
            self_conditioning = processed
            x[:, lo:hi] = a
            last = done.all() or s == 1
            final_end = lo
            if last:
                finished_rows = _finish_canvas(x, lo, hi, finished_rows, end_ids, pad)
                final_end = hi
            # Drafts: the accepted positions; at the end, the whole canvas.
            written = [np.flatnonzero(row) + lo for row in np.array(accepted)]
            if last:
                written = [np.arange(lo, hi)] * B
            yield Step(
                c,
                N - s,
                x,
                written,
                [np.zeros(len(w)) for w in written],
                np.arange(lo, hi),
                logprobs,
                nfe,
                done=bool(last and finished_rows.all()),
                block_start=lo,
                block_length=C,
                final_end=final_end,
                tokens_in=C,
                prompt_length=P,
            )
            if last:
                break
        if finished_rows.all():
            return


def entropy_bound_accept(entropy: mx.array, bound: float) -> mx.array:
    """The reference's entropy bound: sort the positions by entropy, and
    accept each whose lower-entropy predecessors sum to at most ``bound``
    (the lowest always)."""
    order = mx.argsort(entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(entropy, order, axis=-1)
    keep = mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy <= bound
    ranks = mx.argsort(order, axis=-1)
    return mx.take_along_axis(keep, ranks, axis=-1)


def _finish_canvas(x, lo, hi, finished, end_ids, pad):
    """After a canvas: rows with an end token in it are finished; with a pad
    id, what follows a row's first end token becomes pad, and a row that had
    finished before gets a canvas of pads."""
    gen = x[:, lo:hi]
    is_end = np.isin(gen, end_ids) if len(end_ids) else np.zeros_like(gen, bool)
    now = finished | is_end.any(axis=1)
    if pad is not None and now.any():
        gen[finished] = pad
        after = (np.cumsum(is_end, axis=1) > 0) & ~(
            (np.cumsum(is_end, axis=1) == 1) & is_end
        )
        rows = now & ~finished
        gen[rows] = np.where(after[rows], pad, gen[rows])
    return now
