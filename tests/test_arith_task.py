"""The worked-arithmetic task of ``benchmarks/train_tiny_llada.py --task arith``:
remainders by repeated subtraction, the data of the ``trained-arith`` twins."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from train_tiny_llada import (  # noqa: E402
    MASK,
    Batches,
    build_tokenizer,
    chat_prompt,
    heldout_problems,
    make_task,
)


@pytest.fixture(scope="module")
def task():
    return make_task("arith")


def test_the_countdown_subtracts_from_the_last_value_until_it_falls_below(task):
    rng = np.random.default_rng(0)
    for q in task.sample(rng, 300):
        x, d = map(int, re.fullmatch(r"(\d+) mod (\d+)=\?", q).groups())
        assert 10 <= x <= 199 and 2 <= d <= 19
        answer = task.answer(q)
        countdown, final = re.fullmatch(
            r"([\d, ]+)\. The answer is (\d+)\.", answer
        ).groups()
        assert all(len(v) == 3 for v in countdown.split(", "))
        values = [int(v) for v in countdown.split(", ")]
        assert values[0] == x and 1 <= len(values) - 1 <= task.max_ops
        # Each value is written once and is the one before less d.
        assert all(a - b == d for a, b in zip(values, values[1:]))
        assert values[-2] >= d > values[-1] == x % d == int(final)
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
    assert shortest == 26 and len(task.problems()) == 3144
    assert task.fits(shortest + 1) and not task.fits(shortest)
    assert longest == 221
    # The prompt is padded to the widest question's.
    assert len(task.widest()) == len("199 mod 19=?")


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


def test_the_digit_probe_masks_each_value_and_reads_its_three_digits(task):
    import mlx.core as mx
    from probe_arith import probe, probe_stop, summary, summary_stop

    tok = build_tokenizer()
    eye = np.eye(tok.get_vocab_size(), dtype=np.float32)
    questions = ["95 mod 7=?", "30 mod 19=?", "100 mod 3=?"]
    sequences = [
        tok.encode(
            chat_prompt(q) + task.answer(q) + "<|eot_id|>", add_special_tokens=False
        ).ids
        for q in questions
    ]

    def oracle(x):
        # Fills every mask with the truth of the row's question, told by its
        # first 22 tokens (the question is in them and never masked).
        row = np.array(x[0])
        (seq,) = [s for s in sequences if (row[:22] == s[:22]).all()]
        row[: len(seq)] = seq
        return mx.array(eye[row])[None]

    def echo(x):
        # Predicts each position's own token: a masked digit is never right.
        return mx.array(eye[np.array(x[0])])[None]

    records = probe(echo, tok, task, questions, values=8)
    # 95 mod 7 has 13 values after its dividend and 100 mod 3 has 33 (8
    # probed each), 30 mod 19 one; each masked two ways.
    assert len(records) == 2 * (8 + 1 + 8)
    assert not any(r["right"].any() for r in records)
    records = probe(oracle, tok, task, questions, values=8)
    assert all(r["right"].all() for r in records)
    # 95 - 7 borrows from the tens, 30 - 19 too, 97 - 3 does not.
    kinds = [r["kind"] for r in records if r["case"] == "rest"]
    assert kinds[0] == "d < 10, borrow" and kinds[8] == "d >= 10, borrow"
    assert kinds[10] == "d < 10, no borrow"
    stops = probe_stop(echo, tok, task, questions)
    assert [r["last"] for r in stops] == [False, True] * 3
    assert not any(r["right"] for r in stops)
    stops = probe_stop(oracle, tok, task, questions)
    assert all(r["right"] for r in stops)

    def stopper(x):
        # The truth, but a full stop wherever a mask was.
        row = np.array(oracle(x)[0].argmax(-1))
        row[np.array(x[0]) == tok.token_to_id(MASK)] = tok.token_to_id(".")
        return mx.array(eye[row])[None]

    stops = probe_stop(stopper, tok, task, questions)
    assert [r["right"] for r in stops] == [False, True] * 3
    assert summary_stop(stops) == (
        "rest: stops after the last value 1.00 (3), goes on after the one before 0.00 (3)"
    )
    lines = summary(records)
    assert lines[0] == "only: hundreds 1.00  tens 1.00  ones 1.00  (17 values)"
    assert "  tens, d >= 10, borrow: 1.00  (1)" in lines


def test_mask_unit_value_masks_each_value_whole_and_the_rest_token_by_token(task):
    tok = build_tokenizer()
    q = "95 mod 7=?"
    answer = task.answer(q)
    spans = task.value_spans(q)
    assert [answer[a:b] for a, b in spans] == [f"{v:03d}" for v in task.worked(q)]
    data = Batches(tok, np.random.default_rng(0), task, [128], 16, set(), "value")
    problems = [q] * 400
    _, _, is_answer = data.make(problems, 128)
    masked, p = data.noised(is_answer, 1e-3, problems)
    P = data.prompt_length
    digits = [(P + a, P + b) for a, b in spans]
    for row in masked:
        assert all(row[a:b].all() or not row[a:b].any() for a, b in digits)
    assert not masked[~is_answer].any()
    # A value is masked with its row's p; so is every other answer token.
    whole = np.array([[row[a] for a, _ in digits] for row in masked])
    rest = is_answer.copy()
    for a, b in digits:
        rest[:, a:b] = False
    assert abs(whole.mean() - p.mean()) < 0.03
    assert abs(masked[rest].mean() - (p * rest).sum() / rest.sum()) < 0.03
    with pytest.raises(ValueError, match="the task has no values"):
        Batches(
            tok, np.random.default_rng(0), make_task("sort"), [16], 4, set(), "value"
        )


def test_mask_unit_step_masks_whether_to_go_on_with_the_value_after(task):
    tok = build_tokenizer()
    q = "30 mod 7=?"
    answer = task.answer(q) + "<"  # <|eot_id|>: one position past the answer
    steps = [answer[a:b] for a, b in task.step_spans(q)]
    assert steps == ["030", ", 023", ", 016", ", 009", ", 002", ". The answer is 2.<"]
    data = Batches(tok, np.random.default_rng(0), task, [64], 16, set(), "step")
    problems = [q] * 400
    _, _, is_answer = data.make(problems, 64)
    masked, p = data.noised(is_answer, 1e-3, problems)
    P = data.prompt_length
    for row in masked:
        for a, b in task.step_spans(q):
            assert row[P + a : P + b].all() or not row[P + a : P + b].any()
    # The end of the answer, <|eot_id|> included, goes with the final sentence.
    last = task.step_spans(q)[-1]
    assert is_answer[0, P + last[1] - 1]
    assert abs(masked[:, P + last[0]].mean() - p.mean()) < 0.03


def test_several_mask_units_give_each_row_one_of_them(task):
    tok = build_tokenizer()
    q = "95 mod 7=?"
    problems = [q] * 600

    def draw(units):
        data = Batches(tok, np.random.default_rng(0), task, [128], 16, set(), units)
        _, _, is_answer = data.make(problems, 128)
        return data.noised(is_answer, 1e-3, problems)[0], data.prompt_length

    masked, P = draw(["token", "value", "step"])

    def whole(row, spans):
        return all(
            row[P + a : P + b].all() or not row[P + a : P + b].any() for a, b in spans
        )

    by_value = np.mean([whole(row, task.value_spans(q)) for row in masked])
    by_step = np.mean([whole(row, task.step_spans(q)) for row in masked])
    # Value and step rows keep each value whole; step rows each step too. A
    # token row does so only by chance (t near 0 or 1).
    assert abs(by_value - 2 / 3) < 0.06 and abs(by_step - 1 / 3) < 0.06
    # One unit in a list draws as that unit alone: a run keeps its seeds.
    assert (draw(["value"])[0] == draw("value")[0]).all()


def test_mask_unit_stop_masks_the_end_padding_with_the_final_sentence(task):
    tok = build_tokenizer()
    q = "30 mod 7=?"
    problems = [q] * 400
    data = Batches(tok, np.random.default_rng(0), task, [64], 16, set(), "stop")
    _, _, is_answer = data.make(problems, 64)
    masked, p = data.noised(is_answer, 1e-3, problems)
    P = data.prompt_length
    *steps, (start, _) = task.step_spans(q)
    for row in masked:
        for a, b in steps:
            assert row[P + a : P + b].all() or not row[P + a : P + b].any()
        # The final sentence, <|eot_id|> and all the padding after it: one unit.
        assert row[P + start :].all() or not row[P + start :].any()
    assert abs(masked[:, P + start].mean() - p.mean()) < 0.03
    # "step" leaves the padding to token masking: its end is often visible.
    data = Batches(tok, np.random.default_rng(0), task, [64], 16, set(), "step")
    masked, _ = data.noised(is_answer, 1e-3, problems)
    assert not all(r[P + start :].all() or not r[P + start :].any() for r in masked)


def test_evaluation_names_where_a_wrong_countdown_first_goes_wrong(task):
    from evaluate_arith import failure

    q = "95 mod 7=?"
    right = task.answer(q)
    assert right.startswith("095, 088, ") and right.endswith(
        "011, 004. The answer is 4."
    )
    assert failure(q, right) is None
    assert failure(q, right.replace("088", "089")) == "wrong value"
    assert failure(q, "The answer is 4.") == "wrong value"
    assert failure(q, right.split(", 011")[0] + ". The answer is 18.") == "stops early"
    assert failure(q, right.replace(", 004.", ", 004, 997.")) == "goes on"
    assert failure(q, right.replace("is 4.", "is 5.")) == "wrong end"
