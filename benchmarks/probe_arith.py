#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Which digits of the countdown a diffusion checkpoint of ``--task arith`` has learned.

For each held-out problem, each of its first ``--values`` values after the
dividend is masked in two ways, with the true answer everywhere else:

- ``only``: that value's three digits, all else visible;
- ``rest``: that value and everything after it, as a block decodes.

Prints the share of hundreds, tens and ones digits the model's argmax gets
right in each case: a digit copied from a neighbour (hundreds) is learned
long before one that needs ``d`` (ones). One forward pass per value and case;
a minute on the CPU for the defaults.
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


def probe(model, tok, task, questions, values):
    """{case: [hundreds, tens, ones] right} over the probed values, and their count."""
    mask, eot, eos = (tok.token_to_id(t) for t in (MASK, EOT, EOS))
    right = {"only": np.zeros(3), "rest": np.zeros(3)}
    n = 0
    for q in questions:
        prompt = tok.encode(chat_prompt(q), add_special_tokens=False).ids
        answer = task.answer(q)
        ids = tok.encode(answer, add_special_tokens=False).ids + [eot]
        seq = np.array(prompt + ids + [eos] * 8)
        P = len(prompt)
        # Each value after the first starts two characters after a comma.
        starts = [i + 2 for i, c in enumerate(answer) if c == ","][:values]
        for s in starts:
            want = seq[P + s : P + s + 3]
            for case in right:
                x = seq.copy()
                x[P + s : P + s + 3 if case == "only" else None] = mask
                logits = model(mx.array(x[None]))[0, P + s : P + s + 3]
                right[case] += np.array(mx.argmax(logits, -1)) == want
            n += 1
    return right, n


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
    right, n = probe(
        model, build_tokenizer(), make_task("arith"), questions, args.values
    )
    for case, r in right.items():
        h, t, o = (r / n).round(2)
        print(f"{case}: hundreds {h:.2f}  tens {t:.2f}  ones {o:.2f}  ({n} values)")


if __name__ == "__main__":
    main()
