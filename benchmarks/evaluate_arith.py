#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Accuracy and speed of the arithmetic fixtures: diffusion against autoregression.

Loads ``tests/fixtures/trained-arith`` (a LLaDA) and
``tests/fixtures/trained-arith-ar`` (the Llama of the same shape trained on
the same problems with the same budget) with ``mlx_lm.load``, and answers
the held-out problems (``heldout.jsonl``, never trained on) one at a time
with mlx-lm's own ``stream_generate``, as a user would: the chat template,
``max_tokens`` 256 (mlx-lm's default), greedy. The diffusion model decodes
in each mode of ``MODES`` (settings passed to ``stream_generate``); the
autoregressive model decodes as mlx-lm does.

For each mode: exact match (the output holds ``The answer is <answer>.``),
answer tokens (mlx-lm's ``generation_tokens``), model calls, tokens per call,
and tokens per second over the wall time of the whole call (prompt
included), all problems together; and where each wrong countdown first
leaves the worked one (``failure``), right final answers included.
``--canvases`` adds a canvas that fits the answer: its length rounded up to
a block (``fit``), an oracle that tells what a perfect canvas size would
buy.

Writes ``EVALUATION.md`` and ``evaluation.json`` next to the diffusion
checkpoint. Run it with OpenBLAS preloaded, on an otherwise idle machine.
"""

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


# Each diffusion mode: the settings stream_generate passes to the sampler.
MODES = {
    "reference (one token a step, no cache)": dict(reference=True),
    "default (dual cache + threshold 0.9)": dict(),
    "threshold 0.9 + prefix cache": dict(cache="prefix"),
    "default + suffix 64": dict(suffix_length=64),
    "default + suffix 32": dict(suffix_length=32),
    "default + suffix 16": dict(suffix_length=16),
    "default + tail window": dict(dual_window="tail"),
    "default + suffix 32 + tail window": dict(suffix_length=32, dual_window="tail"),
    "default + suffix 32 + tail window, blocks of 16": dict(
        suffix_length=32, dual_window="tail", block_length=16
    ),
    "threshold 0.7 + suffix 32 + tail window": dict(
        threshold=0.7, suffix_length=32, dual_window="tail"
    ),
    "threshold 0.5 + suffix 32 + tail window": dict(
        threshold=0.5, suffix_length=32, dual_window="tail"
    ),
}
# At the canvas that fits the answer: the reference, the default and the
# fastest approximations.
FIT_MODES = [
    "reference (one token a step, no cache)",
    "default (dual cache + threshold 0.9)",
    "default + suffix 32 + tail window",
]
AUTOREGRESSIVE = "autoregressive (mlx-lm)"
FAILURES = ["wrong value", "stops early", "goes on", "wrong end"]


def load_problems(path: Path, n=None):
    lines = (path / "heldout.jsonl").read_text().splitlines()
    problems = [json.loads(line) for line in lines if line.strip()]
    return problems[:n] if n else problems


def answer_tokens(tokenizer, question):
    """The worked answer's length in tokens (for the ``fit`` canvas)."""
    from train_tiny_llada import make_task

    task = make_task("arith")
    return len(tokenizer.encode(task.answer(question), add_special_tokens=False))


def failure(question, text):
    """How a decoded answer first leaves the worked one (None where it does
    not): a wrong value, a stop too early, going on past the last value, or
    a wrong final sentence after the right countdown."""
    from train_tiny_llada import make_task

    task = make_task("arith")
    want = [f"{v:03d}" for v in task.worked(question)]
    countdown = re.match(r"\d{3}(?:, \d{3})*", text)
    values = countdown.group(0).split(", ") if countdown else []
    if not values:
        return "wrong value"
    for got, right in zip(values, want):
        if got != right:
            return "wrong value"
    if len(values) != len(want):
        return "stops early" if len(values) < len(want) else "goes on"
    return None if text.startswith(task.answer(question)) else "wrong end"


def run(model, tokenizer, problems, max_tokens, settings, count_calls):
    """Decode every problem with stream_generate; totals and exact match."""
    from mlx_lm import stream_generate

    right = tokens = calls = 0
    outputs, failures = [], {}
    wall = 0.0
    for i, problem in enumerate(problems):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem["prompt"]}],
            add_generation_prompt=True,
        )
        steps = []
        kwargs = dict(settings)
        if count_calls:
            kwargs["on_step"] = steps.append
        n = max_tokens(problem) if callable(max_tokens) else max_tokens
        text, last = "", None
        tic = time.perf_counter()
        for last in stream_generate(model, tokenizer, prompt, max_tokens=n, **kwargs):
            text += last.text
        wall += time.perf_counter() - tic
        tokens += last.generation_tokens
        # An autoregressive call per token after the prompt's.
        calls += steps[-1].nfe if count_calls else last.generation_tokens
        right += f"The answer is {problem['answer']}." in text
        outputs.append(text)
        if (why := failure(problem["prompt"], text)) is not None:
            failures[why] = failures.get(why, 0) + 1
    return (
        dict(
            exact_match=right / len(problems),
            tokens=tokens,
            calls=calls,
            tokens_per_call=tokens / calls,
            calls_per_token=calls / tokens,
            seconds=wall,
            tokens_per_second=tokens / wall,
            failures=failures,
        ),
        outputs,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "tests/fixtures/trained-arith")
    p.add_argument(
        "--ar-model", type=Path, default=ROOT / "tests/fixtures/trained-arith-ar"
    )
    p.add_argument("--problems", type=int, help="the first N held-out problems")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument(
        "--canvases",
        nargs="+",
        default=["256"],
        help="'256' (--max-tokens) and/or 'fit' (the answer rounded up to a block)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        help="default: all at 256, FIT_MODES at fit",
    )
    p.add_argument("--out", type=Path, help="default: next to --model")
    args = p.parse_args()

    import mlx_lm

    load_start = os.getloadavg()
    model, tokenizer = mlx_lm.load(str(args.model))
    ar_model, ar_tokenizer = mlx_lm.load(str(args.ar_model))
    problems = load_problems(args.model, args.problems)
    bl = args.block_length

    def fit(problem):
        need = answer_tokens(tokenizer, problem["prompt"]) + 1  # and <|eot_id|>
        return -(-need // bl) * bl

    rows = []
    # The autoregressive baseline first and last: the machine's drift shows.
    for canvas in args.canvases:
        max_tokens = fit if canvas == "fit" else args.max_tokens
        label = "fit" if canvas == "fit" else str(args.max_tokens)
        modes = args.modes or (FIT_MODES if canvas == "fit" else list(MODES))
        for mode in [AUTOREGRESSIVE] + modes:
            if mode == AUTOREGRESSIVE:
                row, _ = run(ar_model, ar_tokenizer, problems, max_tokens, {}, False)
            else:
                row, _ = run(model, tokenizer, problems, max_tokens, MODES[mode], True)
            row.update(mode=mode, canvas=label)
            rows.append(row)
            print(json.dumps(row), flush=True)
    row, _ = run(ar_model, ar_tokenizer, problems, args.max_tokens, {}, False)
    row.update(mode=AUTOREGRESSIVE + ", again", canvas=str(args.max_tokens))
    rows.append(row)
    print(json.dumps(row), flush=True)

    out = args.out or args.model
    result = dict(
        problems=len(problems),
        block_length=bl,
        machine=platform.platform(),
        device=str(mx.default_device()),
        load_average=dict(start=load_start, end=os.getloadavg()),
        rows=rows,
    )
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "EVALUATION.md").write_text(markdown(result, args))


def markdown(result, args):
    lines = [
        "# Evaluation: diffusion against autoregression on worked arithmetic",
        "",
        f"`python benchmarks/evaluate_arith.py {shlex.join(sys.argv[1:])}`",
        "",
        f"{result['problems']} held-out problems (`heldout.jsonl`), one at a "
        "time through `mlx_lm.stream_generate`, greedy. Exact match: the "
        "output holds `The answer is <answer>.`. Tokens per second: answer "
        "tokens over the wall time of the whole calls (prompts included). "
        "Autoregressive calls: one per generated token. Canvas `fit`: the "
        "answer's length rounded up to a block (an oracle).",
        "",
        f"Machine: {result['machine']}, MLX {result['device']}; load average "
        f"{result['load_average']['start'][0]:.2f} at the start, "
        f"{result['load_average']['end'][0]:.2f} at the end.",
        "",
        "Worked answer right: the whole countdown and final sentence as "
        "trained (a countdown that skips values can still end on the right "
        "remainder). Failures: where each other output first leaves it "
        "(a wrong value / stops early / goes on past the last value / a wrong "
        "end after the right countdown).",
        "",
        "| canvas | mode | exact match | worked answer right | tokens/s | "
        "vs autoregressive | tokens per call | calls per token | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    ar = {r["canvas"]: r for r in result["rows"] if r["mode"] == AUTOREGRESSIVE}
    for r in result["rows"]:
        base = ar.get(r["canvas"], ar[str(args.max_tokens)])
        lines.append(
            f"| {r['canvas']} | {r['mode']} | {r['exact_match']:.3f} | "
            f"{1 - sum(r['failures'].values()) / result['problems']:.3f} | "
            f"{r['tokens_per_second']:.1f} | "
            f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x | "
            f"{r['tokens_per_call']:.2f} | {r['calls_per_token']:.3f} | "
            f"{' / '.join(str(r['failures'].get(k, 0)) for k in FAILURES)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
