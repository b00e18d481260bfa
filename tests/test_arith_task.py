"""The worked-arithmetic task of ``benchmarks/train_tiny_llada.py --task arith``:
remainders by repeated subtraction, the data of the ``trained-arith`` twins."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from train_tiny_llada import (  # noqa: E402
    Batches,
    build_tokenizer,
    heldout_problems,
    make_task,
)

STEP = re.compile(r"(\d+)-(\d+)=(\d+)\.")


@pytest.fixture(scope="module")
def task():
    return make_task("arith")


def test_every_step_subtracts_from_the_last_result_until_it_falls_below(task):
    rng = np.random.default_rng(0)
    for q in task.sample(rng, 300):
        x, d = map(int, re.fullmatch(r"(\d+) mod (\d+)=\?", q).groups())
        assert 10 <= x <= 199 and 2 <= d <= 19
        answer = task.answer(q)
        steps = STEP.findall(answer)
        assert 1 <= len(steps) <= task.max_ops
        value = x
        for a, b, c in steps:
            assert (int(a), int(b), int(c)) == (value, d, value - d)
            value -= d
        assert value == x % d
        assert answer.endswith(f"The answer is {x % d}.")
        assert task.correct(f"... The answer is {x % d}.", q)
        assert not task.correct(f"The answer is {x % d + 1}.", q)


def test_a_sampled_answer_fits_its_canvas_and_the_longest_is_longest(task):
    tok = build_tokenizer()
    rng = np.random.default_rng(1)
    longest = len(task.answer(task.longest()))
    # One character is one token.
    assert len(tok.encode(task.answer(task.longest())).ids) == longest
    for canvas in (64, 128, 256):
        for q in task.sample(rng, 200, max_answer_tokens=canvas - 1):
            assert len(task.answer(q)) <= min(canvas - 1, longest)
    shortest = min(len(task.answer(q)) for q in task.problems())
    assert shortest == 24 and len(task.problems()) == 2699
    assert task.fits(shortest + 1) and not task.fits(shortest)
    assert longest + 1 <= 256


def test_the_heldout_problems_are_fixed_and_never_in_the_training_stream(task):
    heldout = heldout_problems(task, 200, 1234)
    assert heldout == heldout_problems(task, 200, 1234)
    assert len(set(heldout)) == 200
    data = Batches(
        build_tokenizer(),
        np.random.default_rng(0),
        task,
        [64, 128, 192, 256],
        16,
        set(heldout),
    )
    seen = set()
    for _ in range(100):
        problems, n = data.next()
        tokens, _, is_answer = data.make(problems, n)
        # Every answer and its <|eot_id|> lie within the canvas.
        assert (tokens[is_answer] == data.ids["<|eot_id|>"]).sum() == len(problems)
        seen.update(problems)
    assert len(seen) > 500 and not seen & set(heldout)
