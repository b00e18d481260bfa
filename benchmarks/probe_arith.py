#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Which digits of the countdown a diffusion checkpoint of ``--task arith`` has learned.

For each held-out problem, each of its first ``--values`` values after the
dividend is masked in two ways, with the true answer everywhere else:

- ``only``: that value's three digits, all else visible;
- ``rest``: that value and everything after it, as a block decodes.

Prints the share of hundreds, tens and ones digits the model's argmax gets
right in each case: a digit copied from a neighbour (hundreds) is learned
long before one that needs ``d`` (ones). Then the tens digit by kind of
step (``d`` of one digit or two, a borrow from the tens or none): a model
that writes the tens digit less one whatever the step is right on borrows
of one-digit ``d`` only. One forward pass per value and case; a minute on
the CPU for the defaults.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_tiny_llada import (  # noqa: E402
    EOS,
    EOT,
    MASK,
    build_tokenizer,
    chat_prompt,
    make_task,
)


def kind(previous, d):
    """The step from ``previous`` by ``d``: what its tens digit depends on."""
    digits = "d < 10" if d < 10 else "d >= 10"
    borrow = "borrow" if previous % 10 < d % 10 else "no borrow"
    return f"{digits}, {borrow}"


def probe(model, tok, task, questions, values):
    """One record per probed value and case: its kind and which digits were right."""
    mask, eot, eos = (tok.token_to_id(t) for t in (MASK, EOT, EOS))
    records = []
    for q in questions:
        d = int(q.rstrip("=?").split(" mod ")[1])
        prompt = tok.encode(chat_prompt(q), add_special_tokens=False).ids
        answer = task.answer(q)
        ids = tok.encode(answer, add_special_tokens=False).ids + [eot]
        seq = np.array(prompt + ids + [eos] * 8)
        P = len(prompt)
        starts = [a for a, _ in task.value_spans(q)[1 : values + 1]]
        for previous, s in zip(task.worked(q), starts):
            want = seq[P + s : P + s + 3]
            for case in ("only", "rest"):
                x = seq.copy()
                x[P + s : P + s + 3 if case == "only" else None] = mask
                logits = model(mx.array(x[None]))[0, P + s : P + s + 3]
                right = np.array(mx.argmax(logits, -1)) == want
                records.append(dict(case=case, kind=kind(previous, d), right=right))
    return records


def probe_stop(model, tok, task, questions):
    """Whether the countdown stops where it should: for the last value and
    the one before it, masked with everything after (as a block decodes),
    is the mark after it right (``.`` after the last, ``,`` before)?"""
    mask, eot, eos = (tok.token_to_id(t) for t in (MASK, EOT, EOS))
    records = []
    for q in questions:
        prompt = tok.encode(chat_prompt(q), add_special_tokens=False).ids
        ids = tok.encode(task.answer(q), add_special_tokens=False).ids + [eot]
        seq = np.array(prompt + ids + [eos] * 8)
        P = len(prompt)
        spans = task.value_spans(q)
        for a, b in spans[-2:]:
            x = seq.copy()
            x[P + a :] = mask
            mark = mx.argmax(model(mx.array(x[None]))[0, P + b], -1).item()
            last = (a, b) == spans[-1]
            records.append(dict(last=last, right=mark == seq[P + b]))
    return records


def summary(records):
    """Lines: each case's digits right, then its tens digit by kind of step."""
    lines = []
    for case in ("only", "rest"):
        rows = [r for r in records if r["case"] == case]
        h, t, o = np.mean([r["right"] for r in rows], axis=0)
        lines.append(
            f"{case}: hundreds {h:.2f}  tens {t:.2f}  ones {o:.2f}  ({len(rows)} values)"
        )
        for k in sorted({r["kind"] for r in rows}):
            tens = [r["right"][1] for r in rows if r["kind"] == k]
            lines.append(f"  tens, {k}: {np.mean(tens):.2f}  ({len(tens)})")
    return lines


def summary_stop(records):
    """One line: the marks right after the last value and after the one before."""
    last = [r["right"] for r in records if r["last"]]
    before = [r["right"] for r in records if not r["last"]]
    return (
        f"rest: stops after the last value {np.mean(last):.2f} ({len(last)}), "
        f"goes on after the one before {np.mean(before):.2f} ({len(before)})"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--problems", type=int, default=40, help="held-out problems")
    p.add_argument("--values", type=int, default=8, help="values probed a problem")
    args = p.parse_args()

    heldout = args.model / "heldout.jsonl"
    if not heldout.exists():
        raise SystemExit(f"{heldout} not found: not a checkpoint of --task arith")
    from mlx_lm import load

    model, _ = load(str(args.model))
    if not hasattr(model, "diffusion"):
        raise SystemExit(f"{args.model} is not a diffusion model: nothing to unmask")
    lines = heldout.read_text().splitlines()[: args.problems]
    questions = [json.loads(line)["prompt"] for line in lines]
    task = make_task("arith")
    records = probe(model, build_tokenizer(), task, questions, args.values)
    print("\n".join(summary(records)))
    print(summary_stop(probe_stop(model, build_tokenizer(), task, questions)))


if __name__ == "__main__":
    main()
