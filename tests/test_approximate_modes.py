"""The loop's approximate modes, each one setting away from the exact loop.

Suffix dropout (``suffix_length``, DPad's): calls see the canvas only up to
that many positions past the current block. The masks after the window are
not computed, attended or cached; they are filled when their block comes. A
window that reaches the canvas's end is the whole canvas: the tokens and the
calls are the loop's without it.

The dual cache's tail window (``dual_window="tail"``): a dual-cache call
recomputes the block from its first position that is still masked or was
committed by the step before (whose keys were computed as masks).
"""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_golden

from mlx_lm_llada import diffusion_generate
from mlx_lm_llada.diffusion import resolve_settings
from mlx_lm_llada.plugin_settings import set_command_settings

GEN, BLOCK = 32, 8


def _prompt(model):
    mx.random.seed(3)
    return mx.random.randint(0, model.args.vocab_size - 8, (2, 5))


def _run(model, prompt, **kwargs):
    steps = []
    out, nfe = diffusion_generate(
        model,
        prompt,
        steps=GEN,
        gen_length=GEN,
        block_length=BLOCK,
        # The loop's canvas is live: each step keeps its own copy.
        on_step=lambda s: steps.append(dataclasses.replace(s, canvas=s.canvas.copy())),
        **kwargs,
    )
    return np.array(out), nfe, steps


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_a_window_past_the_canvas_changes_nothing(cache):
    model, _ = load_golden("tiny-mha")
    prompt = _prompt(model)
    whole, nfe, _ = _run(model, prompt, cache=cache)
    window, window_nfe, _ = _run(model, prompt, cache=cache, suffix_length=GEN)
    assert (whole == window).all() and nfe == window_nfe


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("suffix", [0, 5])
def test_calls_see_the_block_and_the_suffix_only(cache, suffix):
    model, _ = load_golden("tiny-mha")
    prompt = _prompt(model)
    P = prompt.shape[1]
    seen = []
    forward = model.__class__.__call__

    class Seeing(model.__class__):
        def __call__(self, inputs, cache=None, attention_mask=None, **kw):
            keys = inputs.shape[1] if cache is None else None
            out = forward(
                self, inputs, cache=cache, attention_mask=attention_mask, **kw
            )
            if cache is not None:
                keys = cache[0].keys.shape[2]
            seen.append(keys)
            return out

    cls = model.__class__
    model.__class__ = Seeing
    try:
        _, _, steps = _run(model, prompt, cache=cache, suffix_length=suffix)
    finally:
        model.__class__ = cls
    for step, keys in zip(steps, seen):
        end = min(P + GEN, step.block_start + BLOCK + suffix)
        assert keys == end, (step.block, step.step)
        if step.step == 0 or cache == "none":
            assert step.tokens_in == end
        elif cache == "prefix":
            assert step.tokens_in == end - step.block_start
        else:
            assert step.tokens_in == BLOCK
    # The canvas is filled all the same.
    assert not (steps[-1].canvas == model.diffusion.mask_token_id).any()


def test_a_padded_batch_keeps_its_padding_mask():
    # The key padding mask is cut to the window with the keys.
    model, _ = load_golden("tiny-mha")
    prompt = np.array(_prompt(model))
    prompt[0, :2] = model.diffusion.eos_token_id
    mask = np.ones_like(prompt)
    mask[0, :2] = 0
    out, _, _ = _run(
        model,
        mx.array(prompt),
        attention_mask=mx.array(mask),
        cache="dual",
        threshold=0.9,
        suffix_length=4,
    )
    # The padded row answers as its unpadded prompt alone does.
    alone, _, _ = _run(
        model, mx.array(prompt[:1, 2:]), cache="dual", threshold=0.9, suffix_length=4
    )
    assert (out[0, 2:] == alone[0]).all()


def test_bad_suffix_lengths_are_refused():
    model, _ = load_golden("tiny-mha")
    prompt = _prompt(model)
    with pytest.raises(ValueError, match="suffix_length must be >= 0"):
        _run(model, prompt, suffix_length=-1)
    with pytest.raises(ValueError, match="suffix_length must be of type int"):
        _run(model, prompt, suffix_length=2.5)
    with pytest.raises(ValueError, match="fill-in-the-middle needs the text"):
        template = np.full((2, 5 + GEN), model.diffusion.mask_token_id)
        template[:, :5] = np.array(prompt)
        template[:, -3:] = 7
        _run(model, prompt, suffix_length=4, template=mx.array(template))


def test_the_reference_schedule_turns_it_off():
    model, _ = load_golden("tiny-mha")
    spec = model.diffusion
    spec = type(spec)(**{**spec.__dict__, "defaults": {"suffix_length": 16}})
    assert resolve_settings(spec).suffix_length == 16
    assert resolve_settings(spec, {"reference": True}).suffix_length is None
    with pytest.raises(ValueError, match="cannot be combined with suffix_length"):
        resolve_settings(spec, {"reference": True, "suffix_length": 16})
    with pytest.raises(ValueError, match="cannot be combined with suffix_length"):
        set_command_settings(reference=True, suffix_length="16")


def test_a_block_causal_model_refuses_it():
    model, _ = load_golden("llada2-tiny", "llada2")
    with pytest.raises(ValueError, match="never reads"):
        next(model.generate_step(mx.array([1, 2, 3]), max_tokens=8, suffix_length=4))


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_the_tail_window_refreshes_the_masks_and_the_last_commits(threshold):
    model, _ = load_golden("tiny-mha")
    mask_id = model.diffusion.mask_token_id
    out, nfe, steps = _run(
        model, _prompt(model), cache="dual", dual_window="tail", threshold=threshold
    )
    assert not (out == mask_id).any()
    shorter = 0
    for before, s in zip(steps, steps[1:]):
        if s.step == 0:
            assert s.tokens_in == s.canvas.shape[1]  # a block's first call: all
            continue
        bs = s.block_start
        start = bs + BLOCK - s.tokens_in
        masked_before = np.flatnonzero(
            (before.canvas[:, bs : bs + BLOCK] == mask_id).any(0)
        )
        assert start <= bs + masked_before[0]  # every mask is recomputed
        assert all(start <= c.min() for c in before.committed if len(c))  # news
        shorter += s.tokens_in < BLOCK
    assert shorter > 0  # the window did shrink


def test_the_tail_window_is_a_mode_of_the_dual_cache():
    model, _ = load_golden("tiny-mha")
    prompt = _prompt(model)
    for cache in ("none", "prefix"):
        with pytest.raises(ValueError, match="a mode of the dual cache"):
            _run(model, prompt, cache=cache, dual_window="tail")
    with pytest.raises(ValueError, match="dual_window must be one of"):
        _run(model, prompt, cache="dual", dual_window="masks")
    spec = model.diffusion
    spec = type(spec)(**{**spec.__dict__, "defaults": {"dual_window": "tail"}})
    exact = resolve_settings(spec, {"reference": True})
    assert exact.dual_window == "block" and exact.cache == "none"


def test_a_shifted_model_reads_its_first_mask_from_inside_the_window():
    # Dream reads position i from the logits at i - 1: the window starts at
    # least one position before the first mask.
    model, _ = load_golden("tiny-mha", "dream")
    mask_id = model.diffusion.mask_token_id
    steps = []
    out, _ = diffusion_generate(
        model,
        _prompt(model),
        max_new_tokens=GEN,
        steps=GEN,
        block_length=BLOCK,
        dual_cache=True,
        dual_window="tail",
        on_step=lambda s: steps.append(
            (s.block_start, s.step, s.tokens_in, s.canvas.copy())
        ),
    )
    assert not (np.array(out) == mask_id).any()
    later = 0
    for before, (bs, step, tokens_in, _) in zip(steps, steps[1:]):
        if step == 0:
            continue
        first_mask = np.flatnonzero((before[3][:, bs : bs + BLOCK] == mask_id).any(0))
        assert bs + BLOCK - tokens_in <= max(bs, bs + first_mask[0] - 1)
        later += 1
    assert later > 0


def test_our_generate_takes_both_as_flags():
    from test_generation_cli import MODEL, expected_text, printed_text, run

    flags = ["--block-length", "8", "--threshold", "0.5", "--cache", "dual"]
    flags += ["--suffix-length", "8", "--dual-window", "tail"]
    out = run(
        "mlx_lm_llada.generate",
        "--model",
        MODEL,
        "--prompt",
        "hello",
        "--max-tokens",
        "32",
        *flags,
    )
    assert out.returncode == 0, out.stderr
    assert printed_text(out.stdout) == expected_text(
        "hello",
        max_tokens=32,
        block_length=8,
        threshold=0.5,
        cache="dual",
        suffix_length=8,
        dual_window="tail",
    )
    # LLaDA's default cache is dual: the flag alone is accepted; with another
    # cache it is refused by name.
    alone = run("mlx_lm_llada.generate", "--model", MODEL, "--dual-window", "tail")
    assert alone.returncode == 0, alone.stderr
    bad = run(
        "mlx_lm_llada.generate",
        "--model",
        MODEL,
        "--cache",
        "prefix",
        "--dual-window",
        "tail",
    )
    assert bad.returncode != 0 and "a mode of the dual cache" in bad.stderr
