# Copyright © 2026 mlx-lm-llada contributors.
"""``diffusion_generate``: the references' own call, for code ported from
them. Each family keeps its argument names (LLaDA's ``generate.py``, Dream's
``diffusion_generate``, and Fast-dLLM's additions to both); all of them run
the one loop."""

import dataclasses
from typing import Any, Callable, Optional, Tuple

import mlx.core as mx
import numpy as np

from .loop import Step, denoise
from .settings import DiffusionSettings, DiffusionSpec


def _llada_arguments(
    prompt_length: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    cache: Optional[str] = None,
    suffix_length: Optional[int] = None,
    dual_window: str = "block",
):
    """LLaDA's ``generate`` and Fast-dLLM's ``generate_with_*_cache``
    (``suffix_length`` and ``dual_window`` are our additions)."""
    settings = dict(
        steps=steps,
        block_length=block_length,
        remasking=remasking,
        cfg_scale=cfg_scale,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        threshold=threshold,
        factor=factor,
        cache=cache or "none",
        suffix_length=suffix_length,
        dual_window=dual_window,
    )
    return dict(
        gen_length=gen_length,
        settings=settings,
        sampling=dict(temp=temperature),
        mask_id=mask_id,
    )


# Dream's ``alg`` names for our confidence functions.
_DREAM_ALGS = {
    "maskgit_plus": "low_confidence",
    "topk_margin": "topk_margin",
    "entropy": "entropy",
    "origin": "origin",
}


def _dream_arguments(
    prompt_length: int,
    max_new_tokens: Optional[int] = None,
    max_length: Optional[int] = None,
    steps: int = 512,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: Optional[float] = None,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    threshold: Optional[float] = 0.9,
    block_length: Optional[int] = None,
    dual_cache: bool = False,
    mask_token_id: Optional[int] = None,
    suffix_length: Optional[int] = None,
    dual_window: str = "block",
):
    """Dream's ``diffusion_generate`` and Fast-dLLM's Dream loops: with
    ``block_length`` the block loop with a prefix (or ``dual_cache``) cache,
    else the whole canvas at once."""
    if max_new_tokens is not None:
        gen_length = max_new_tokens
    elif max_length is not None:
        gen_length = max_length - prompt_length
    else:
        gen_length = 20  # DreamGenerationConfig's max_length, as new tokens
    settings = dict(
        steps=steps,
        eps=eps,
        alg_temp=alg_temp or 0.0,
        block_length=block_length,
        schedule="timesteps",
        suffix_length=suffix_length,
        dual_window=dual_window,
    )
    if block_length is not None:
        settings["cache"] = "dual" if dual_cache else "prefix"
    if alg == "confidence_threshold":
        settings.update(remasking="low_confidence", threshold=threshold)
        if block_length is None:
            # Fast-dLLM's Dream rule: an even quota per step, capped.
            settings.update(schedule="even", capped_threshold=True)
    elif alg in _DREAM_ALGS:
        settings["remasking"] = _DREAM_ALGS[alg]
    else:
        raise ValueError(
            f"alg must be one of {sorted(_DREAM_ALGS) + ['confidence_threshold']}, "
            f"got {alg!r}"
        )
    sampling = dict(temp=temperature, top_p=top_p or 0.0, top_k=top_k or 0)
    return dict(
        gen_length=gen_length,
        settings=settings,
        sampling=sampling,
        mask_id=mask_token_id,
    )


def _llada2_arguments(
    prompt_length: int,
    temperature: float = 0.0,
    block_length: int = 32,
    steps: int = 32,
    gen_length: int = 2048,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    threshold: float = 0.95,
    eos_id: Optional[int] = None,
    mask_id: Optional[int] = None,
    editing_threshold: Optional[float] = None,
    max_post_steps: Optional[int] = None,
    num_to_transfer: Optional[int] = None,
    cache: str = "prefix",
):
    """LLaDA 2.0's ``generate`` and, given any of ``editing_threshold``,
    ``max_post_steps`` or ``num_to_transfer``, LLaDA 2.1's (token editing;
    ``steps`` and ``minimal_topk`` are then unused, as there). ``cache`` is
    ours: ``"prefix"`` keeps the finished blocks' keys (the same tokens and
    calls), ``"none"`` recomputes every earlier block at every step, as the
    reference does.

    The reference returns the generated tokens cut after the first
    ``eos_id``: stopping once that end is final changes none of them, so
    generation always stops there (``eos_early_stop`` is implied)."""
    if isinstance(minimal_topk, int) and minimal_topk <= 0:
        raise ValueError(f"minimal_topk must be positive, got {minimal_topk}")
    settings = dict(
        block_length=block_length,
        threshold=threshold,
        threshold_floor="scheduled",
        cache=cache,
    )
    if (editing_threshold, max_post_steps, num_to_transfer) != (None, None, None):
        settings.update(
            num_to_transfer=1 if num_to_transfer is None else num_to_transfer,
            editing_threshold=0.9 if editing_threshold is None else editing_threshold,
            max_post_steps=16 if max_post_steps is None else max_post_steps,
        )
    else:
        steps = min(steps, gen_length // minimal_topk)
        if steps <= 0:
            raise ValueError(
                f"steps is {steps} after min(steps, gen_length // minimal_topk) "
                f"(gen_length {gen_length}, minimal_topk {minimal_topk}): "
                "no step would run"
            )
        settings.update(steps=steps, schedule="block")
    sampling = dict(temp=temperature, top_p=top_p or 0.0, top_k=top_k or 0)
    return dict(
        gen_length=gen_length,
        settings=settings,
        sampling=sampling,
        mask_id=mask_id,
        eos_id=eos_id,
        early_stop=True,
    )


_UNSET = object()


def _diffusion_gemma_arguments(
    prompt_length: int,
    max_new_tokens: Optional[int] = None,
    max_denoising_steps: Optional[int] = None,
    entropy_bound: Optional[float] = None,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    stability_threshold: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    canvas_length: Optional[int] = None,
    eos_token_id=_UNSET,
    pad_token_id=_UNSET,
):
    """DiffusionGemma's ``generate``: the generation config's names (unset:
    the checkpoint's defaults). ``max_new_tokens`` is rounded up to whole
    canvases, as there; ``eos_token_id`` (an id, a list, or None for none)
    and ``pad_token_id`` replace the model's."""
    given = dict(
        max_denoising_steps=max_denoising_steps,
        entropy_bound=entropy_bound,
        t_min=t_min,
        t_max=t_max,
        stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold,
        block_length=canvas_length,
    )
    call = dict(
        gen_length=max_new_tokens,
        settings={k: v for k, v in given.items() if v is not None},
        sampling=dict(temp=None),
        mask_id=None,
    )
    if eos_token_id is not _UNSET:
        call["end_ids"] = eos_token_id
    if pad_token_id is not _UNSET:
        call["pad_id"] = pad_token_id
    return call


REFERENCE_ARGUMENTS = {
    "LLaDA": _llada_arguments,
    "Dream": _dream_arguments,
    "LLaDA2": _llada2_arguments,
    "DiffusionGemma": _diffusion_gemma_arguments,
}


def diffusion_generate(
    model,
    prompt: mx.array,
    attention_mask: Optional[mx.array] = None,
    *,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    early_stop: bool = False,
    on_step: Optional[Callable[[Step], None]] = None,
    template: Optional[mx.array] = None,
    noise: Optional[Callable[[int, tuple], mx.array]] = None,
    **params: Any,
) -> Tuple[mx.array, int]:
    """Generate as the model family's reference code does, with its arguments.

    Args:
        prompt: Token ids ``[B, P]``; a batch is left-padded.
        attention_mask: ``[B, P]``, 1 for tokens and 0 for padding.
        sampler: Chooses candidate tokens from log-probabilities ``[N, V]``
            (mlx-lm's ``make_sampler``). Defaults to mlx-lm's sampler for the
            family's ``temperature`` (and Dream's ``top_p``, ``top_k``).
        early_stop: Stop once every row has an end token with everything
            before it committed; the rest is filled with EOS.
        on_step: Called with a :class:`Step` after each model call.
        template: The canvas to start from, ``[B, P + gen_length]``: the
            prompt, then fixed tokens and gaps of mask tokens, which alone are
            filled (fill-in-the-middle, edits).
        params: The family's own arguments. LLaDA: ``steps``, ``gen_length``,
            ``block_length``, ``temperature``, ``cfg_scale``, ``remasking``,
            ``mask_id``, ``logits_eos_inf``, ``confidence_eos_eot_inf`` and
            Fast-dLLM's ``threshold``, ``factor``, ``cache`` (and our
            ``suffix_length`` and ``dual_window``, for Dream too). Dream:
            ``max_new_tokens`` (or ``max_length``), ``steps``, ``eps``,
            ``alg``, ``alg_temp``, ``temperature``, ``top_p``, ``top_k`` and
            Fast-dLLM's ``threshold``, ``block_length``, ``dual_cache``.
            LLaDA 2: ``gen_length``, ``block_length``, ``steps``,
            ``threshold``, ``minimal_topk``, ``eos_early_stop``, ``eos_id``,
            ``mask_id``, ``temperature``, ``top_p``, ``top_k``, 2.1's
            ``editing_threshold``, ``max_post_steps``, ``num_to_transfer``,
            and ``cache`` (``"prefix"``, exact, or ``"none"``).

    Returns:
        ``(tokens, nfe)``: the whole sequence ``[B, P + gen_length]`` and the
        number of model calls. LLaDA 2 stops at the first ``eos_id`` (its
        reference returns the generated tokens cut there); the rest is EOS.
    """
    prompt = as_batch(prompt)
    spec = model.diffusion
    arguments = REFERENCE_ARGUMENTS.get(spec.family)
    if arguments is None:
        raise ValueError(f"No reference arguments are known for {spec.family}")
    try:
        call = arguments(prompt.shape[1], **params)
    except TypeError as e:
        raise ValueError(f"{spec.family}'s diffusion_generate: {e}") from None
    gen_length, given, sampling = call["gen_length"], call["settings"], call["sampling"]
    mask_id = call["mask_id"]
    if mask_id is not None and mask_id != spec.mask_token_id:
        spec = dataclasses.replace(spec, mask_token_id=mask_id)
    if "eos_id" in call:
        # The reference's only end token.
        eos_id = spec.eos_token_id if call["eos_id"] is None else call["eos_id"]
        spec = dataclasses.replace(spec, eos_token_id=eos_id, eot_token_id=None)
    early_stop = early_stop or call.get("early_stop", False)
    if "end_ids" in call:
        ends = call["end_ids"]
        ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
        spec = dataclasses.replace(
            spec,
            eos_token_id=ends[0] if ends else None,
            eot_token_id=None,
            more_end_token_ids=tuple(ends[1:]),
        )
    if "pad_id" in call:
        spec = dataclasses.replace(spec, pad_token_id=call["pad_id"])
    if spec.noise == "uniform":
        given = {**spec.defaults, **given}
        gen_length = gen_length or given["block_length"]
    elif noise is not None:
        raise ValueError(f"noise= is for uniform-noise models, not {spec.family}")
    if sampler is None and sampling["temp"] is not None and sampling["temp"] > 0:
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(**sampling)
    settings = DiffusionSettings(**given)
    check_length(spec, prompt.shape[1], gen_length)
    if attention_mask is not None:
        check_left_padding(attention_mask, prompt.shape)
    if template is not None:
        template = check_template(template, prompt, gen_length, spec.mask_token_id)
    last = None
    for last in denoise(
        model,
        prompt,
        gen_length,
        settings,
        attention_mask=attention_mask,
        sampler=sampler,
        early_stop=early_stop,
        spec=spec,
        template=template,
        noise=noise,
    ):
        if on_step is not None:
            on_step(last)
    canvas = last.canvas
    if spec.noise == "uniform":
        # Whole canvases, up to the last one made (rows that all ended
        # stop the canvases early).
        canvas = canvas[:, : last.block_start + last.block_length]
    return mx.array(canvas), last.nfe


def as_batch(prompt) -> mx.array:
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be token ids [B, P], got shape {prompt.shape}")
    if prompt.shape[1] == 0:
        raise ValueError("The prompt is empty: a diffusion model needs a prompt")
    return prompt


def check_left_padding(attention_mask: mx.array, shape):
    """A batch's attention mask: 0 for left padding, then 1 for tokens."""
    mask = np.array(attention_mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {mask.shape}, the prompt {tuple(shape)}"
        )
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (tokens)")
    if (np.diff(mask.astype(np.int64), axis=1) < 0).any() or not mask[:, -1].all():
        raise ValueError(
            "attention_mask must pad on the left: zeros, then ones to the end"
        )


def check_template(template, prompt: mx.array, gen_length: int, mask_id: int):
    """A template: ``[B, P + gen_length]``, the prompt first, then at least
    one gap of mask tokens."""
    template = np.array(template, dtype=np.int64)
    B, P = prompt.shape
    if template.ndim == 1:
        template = template[None]
    if template.shape != (B, P + gen_length):
        raise ValueError(
            f"template has shape {template.shape}: expected {(B, P + gen_length)} "
            f"(the prompt's {P} tokens, then the {gen_length} to generate)"
        )
    if (template[:, :P] != np.array(prompt)).any():
        raise ValueError("template must begin with the prompt")
    if not (template[:, P:] == mask_id).any(axis=1).all():
        raise ValueError(
            f"template has no gap to fill: mark gaps with the mask token ({mask_id})"
        )
    return template


def check_length(spec: DiffusionSpec, prompt_length: int, gen_length: int):
    limit = spec.max_sequence_length
    if limit is not None and prompt_length + gen_length > limit:
        raise ValueError(
            f"The prompt ({prompt_length} tokens) plus the canvas ({gen_length} "
            f"tokens) is longer than the model's context (max_sequence_length "
            f"{limit})"
        )
