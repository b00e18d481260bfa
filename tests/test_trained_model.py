"""Decoding modes on a trained LLaDA: parallel decoding keeps its answers.

``tests/fixtures/trained-sorter`` is a tiny LLaDA trained with LLaDA's SFT
objective to sort 6 to 8 digits in answer canvases of 16 to 256 tokens
(``benchmarks/train_tiny_llada.py``); its held-out problems and their answers
are in ``evaluation.json``. A random model cannot tell a good decoding rule
from a bad one; this one can.
"""

import json
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_lm_llada import diffusion_generate

TRAINED = FIXTURES / "trained-sorter"
N = 32  # held-out problems, one batch
CANVAS, BLOCK = 16, 8  # the shortest trained canvas
# mlx-lm's default max_tokens and the checkpoint's block.
LONG_N, LONG_CANVAS, LONG_BLOCK = 8, 256, 32


@pytest.fixture(scope="module")
def trained():
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(TRAINED))
    with open(TRAINED / "evaluation.json") as f:
        heldout = json.load(f)["heldout"][:N]
    return model, tokenizer, heldout


def _batch(tokenizer, questions):
    encs = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        for q in questions
    ]
    P = max(map(len, encs))
    prompt = np.full((len(encs), P), tokenizer.eos_token_id, dtype=np.int32)
    mask = np.zeros((len(encs), P), dtype=np.int32)
    for i, e in enumerate(encs):
        prompt[i, P - len(e) :] = e
        mask[i, P - len(e) :] = 1
    return mx.array(prompt), mx.array(mask)


def _correct(model, tokenizer, heldout, gen_length=CANVAS, **kwargs):
    prompt, mask = _batch(tokenizer, [q for q, _ in heldout])
    out, nfe = diffusion_generate(
        model, prompt, attention_mask=mask, gen_length=gen_length, **kwargs
    )
    ends = set(model.diffusion.end_token_ids)
    right = 0
    for row, (_, answer) in zip(np.array(out)[:, prompt.shape[1] :], heldout):
        row = row.tolist()
        cut = next((i for i, t in enumerate(row) if t in ends), len(row))
        right += tokenizer.decode(row[:cut]).strip() == answer
    return right, nfe


@pytest.fixture(scope="module")
def reference(trained):
    """Correct answers and model calls of LLaDA's schedule (one token a step)."""
    model, tokenizer, heldout = trained
    return _correct(model, tokenizer, heldout, steps=CANVAS, block_length=BLOCK)


FAST = {
    "threshold 0.9 + dual cache": dict(threshold=0.9, cache="dual"),
    # Several calls per block: the cached keys and values serve.
    "threshold 0.999 + dual cache": dict(threshold=0.999, cache="dual"),
}


@pytest.mark.parametrize("settings", FAST.values(), ids=FAST.keys())
def test_parallel_decoding_keeps_reference_accuracy(trained, reference, settings):
    model, tokenizer, heldout = trained
    ref, ref_nfe = reference
    fast, fast_nfe = _correct(
        model, tokenizer, heldout, steps=CANVAS, block_length=BLOCK, **settings
    )
    assert ref >= 0.9 * N, f"reference schedule: {ref}/{N}"
    assert ref_nfe == CANVAS
    assert fast >= ref - 1, f"{settings}: {fast}/{N}, reference {ref}/{N}"
    assert fast_nfe < ref_nfe, f"{settings}: {fast_nfe} model calls"


def test_dual_cache_keeps_reference_accuracy(trained, reference):
    # The reference schedule, with all but a block's first call on the cache.
    model, tokenizer, heldout = trained
    ref, _ = reference
    cached, nfe = _correct(
        model, tokenizer, heldout, steps=CANVAS, block_length=BLOCK, cache="dual"
    )
    assert cached >= ref - 1, f"dual cache {cached}/{N}, reference {ref}/{N}"
    assert nfe == CANVAS


def test_long_canvas_threshold_keeps_reference_accuracy(trained):
    # A short answer in a long canvas. Both stop early: a token before the
    # first end token is final once committed, so the answers are the same.
    model, tokenizer, heldout = trained
    heldout = heldout[:LONG_N]
    common = dict(gen_length=LONG_CANVAS, steps=LONG_CANVAS, block_length=LONG_BLOCK)
    ref, ref_nfe = _correct(model, tokenizer, heldout, early_stop=True, **common)
    fast, fast_nfe = _correct(
        model,
        tokenizer,
        heldout,
        threshold=0.9,
        cache="dual",
        early_stop=True,
        **common,
    )
    assert ref >= LONG_N - 2, f"reference schedule: {ref}/{LONG_N}"
    assert ref_nfe == LONG_BLOCK  # every answer ends in the first block
    assert fast >= ref, f"threshold 0.9 + dual cache: {fast}/{LONG_N}, reference {ref}"
    assert fast_nfe <= 3, f"{fast_nfe} model calls"


def test_mlx_lm_generate_answers_with_its_defaults(trained):
    # mlx-lm's default max_tokens (256) and the checkpoint's diffusion defaults.
    import mlx_lm

    model, tokenizer, heldout = trained
    right = 0
    for question, answer in heldout[:8]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        right += mlx_lm.generate(model, tokenizer, prompt).strip() == answer
    assert right >= 7, f"{right}/8"


def test_generation_speed_counts_the_call_that_made_the_tokens(trained):
    """A one-call answer (the sorter's usual) reports tokens over the time
    they took: within a factor of 2 of tokens divided by wall time, not the
    thousands of tokens a second that timing after its only call would give."""
    from mlx_lm import stream_generate

    model, tokenizer, heldout = trained
    question, answer = heldout[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    calls = []
    start = time.perf_counter()
    responses = list(
        stream_generate(
            model, tokenizer, prompt, max_tokens=16, on_step=lambda s: calls.append(s)
        )
    )
    wall = time.perf_counter() - start
    assert len(calls) == 1  # one model call made every token
    honest = responses[-1].generation_tokens / wall
    assert honest / 2 <= responses[-1].generation_tps <= honest * 2


def test_mlx_lm_generate_prints_an_honest_speed_for_a_one_call_answer(trained):
    """The figure ``mlx_lm.generate`` prints, against the answer's tokens over
    the wall time of its ``generate`` call (timed around it in the same
    process): within a factor of 2."""
    import re
    import subprocess
    import sys

    _, _, heldout = trained
    question, answer = heldout[0]
    timed = (
        "import sys, time\n"
        "import mlx_lm.generate\n"
        "g = sys.modules['mlx_lm.generate']  # the module, not the function\n"
        "inner = g.generate\n"
        "def generate(*args, **kwargs):\n"
        "    tic = time.perf_counter()\n"
        "    out = inner(*args, **kwargs)\n"
        "    print(f'WALL {time.perf_counter() - tic}')\n"
        "    return out\n"
        "g.generate = generate\n"
        "sys.argv = ['mlx_lm.generate'] + sys.argv[1:]\n"
        "g.main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", timed, "--model", str(TRAINED), "--prompt", question],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert answer in out.stdout
    tokens, tps = re.search(
        r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", out.stdout
    ).groups()
    wall = float(re.search(r"WALL ([\d.]+)", out.stdout).group(1))
    honest = int(tokens) / wall
    assert honest / 2 <= float(tps) <= honest * 2, out.stdout
