"""Fill-in-the-middle on a trained LLaDA: a masked span of held-out answers.

``tests/fixtures/trained-sorter`` sorts digits (``benchmarks/train_tiny_llada.py``).
Its right answer's canvas (prompt, sorted digits, ``<|eot_id|>``, padding)
is given with a span in the middle of the digits masked; the model fills
the span and must leave every other token as it is. The full measurement,
against a baseline that sees only the prefix, is
``benchmarks/evaluate_infill.py`` (``INFILL.md`` next to the checkpoint).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from evaluate_infill import answer_canvases, fill, score, templates  # noqa: E402
from train_tiny_llada import heldout_problems, make_task  # noqa: E402

TRAINED = FIXTURES / "trained-sorter"
N = 8  # the first held-out problems, one batch
CANVAS, BLOCK = 16, 8  # the shortest trained canvas


@pytest.fixture(scope="module")
def sorter():
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(TRAINED))
    task = make_task("sort")
    problems = heldout_problems(task)[:N]
    prompt, mask, canvas, lengths = answer_canvases(tokenizer, task, problems, CANVAS)
    return model, prompt, mask, canvas, lengths


MODES = {
    "reference": dict(steps=CANVAS, gen_length=CANVAS, block_length=BLOCK),
    "threshold 0.9 + dual cache": dict(
        steps=CANVAS, gen_length=CANVAS, block_length=BLOCK, threshold=0.9, cache="dual"
    ),
}


@pytest.mark.parametrize("span", ["mid3", "inner"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_infill_fills_the_middle_of_held_out_answers(sorter, mode, span):
    model, prompt, mask, canvas, lengths = sorter
    mask_id = model.diffusion.mask_token_id
    infill, _, spans = templates(canvas, prompt.shape[1], lengths, span, mask_id)
    out, nfe, batch_nfe, _ = fill(model, prompt, mask, infill, mode)

    right, kept = score(out, canvas, infill, spans, mask_id)
    # Every token outside the span, the prompt's padding included, is kept.
    assert kept.all(), f"fixed tokens changed in rows {np.flatnonzero(~kept)}"
    assert (out[infill != mask_id] == infill[infill != mask_id]).all()
    assert not (out == mask_id).any()
    # Measured: 8/8 in every case (benchmarks/evaluate_infill.py, 200/200 or
    # 198/200 on the whole held-out set).
    assert right.sum() >= N - 2, f"{right.sum()}/{N} spans right: {right}"
    gap = max(b - a for a, b in spans)
    if "threshold" in mode:
        assert batch_nfe < gap
    else:
        # One token per call: a call per masked token, none for fixed ones.
        assert batch_nfe == gap
        assert (nfe == [b - a for a, b in spans]).all()


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_infill_across_blocks_and_a_shorter_last_block(sorter, cache):
    # Blocks of 5 in a 16-token canvas (5, 5, 5, then 1): every 7- and
    # 8-digit answer's inner span runs across the first block's end.
    model, prompt, mask, canvas, lengths = sorter
    mask_id = model.diffusion.mask_token_id
    infill, _, spans = templates(canvas, prompt.shape[1], lengths, "inner", mask_id)
    mode = dict(steps=CANVAS, gen_length=CANVAS, block_length=5, cache=cache)
    out, nfe, _, _ = fill(model, prompt, mask, infill, mode)

    right, kept = score(out, canvas, infill, spans, mask_id)
    assert kept.all(), f"fixed tokens changed in rows {np.flatnonzero(~kept)}"
    assert right.sum() >= N - 2, f"{right.sum()}/{N} spans right: {right}"
    assert (nfe == [b - a for a, b in spans]).all()
