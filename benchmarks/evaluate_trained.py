#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Exact-match accuracy and model calls of each decoding mode on a trained LLaDA.

Loads the checkpoint that ``train_tiny_llada.py`` wrote (through
``mlx_lm.load``, as a user would), takes its fixed held-out problems (never
trained on), and decodes them with ``diffusion_generate`` in each mode: the
reference schedule (one token per step), Fast-dLLM's threshold and factor
rules, the prefix and dual caches, and early stop, at each canvas of
``--canvases`` (by default 16 and 256 tokens, the shortest and the longest
the fixture was trained on; on a canvas longer than 64 tokens every mode
stops early, which leaves its answers unchanged). The problems run as one
left-padded batch with an attention mask.

Model calls (NFE) are counted per problem: a call counts for a problem when
it commits at least one of its tokens (until its early stop, if on). That is
the NFE the problem would need alone; the batch makes as many calls as its
slowest row (reported too). A subset is also decoded one problem at a time to
check that batching changes neither the tokens nor the per-problem NFE.

Writes ``EVALUATION.md`` and ``evaluation.json`` next to the checkpoint.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from train_tiny_llada import heldout_problems, make_task  # noqa: E402

from mlx_lm_llada import diffusion_generate  # noqa: E402

# A long canvas is mostly end padding. Beyond this length every mode stops
# early: a token before the first end token is final once committed, so the
# answer is the same, and the padding after it is not computed.
LONG_CANVAS = 64


def modes(gen_length, block_length):
    """(name, diffusion_generate keyword arguments) for each decoding mode."""
    ref = dict(steps=gen_length, gen_length=gen_length)
    b, one = dict(block_length=block_length), dict(block_length=gen_length)
    dual9 = {**ref, **b, "threshold": 0.9, "cache": "dual"}
    out = [
        (f"reference (block {block_length})", {**ref, **b}),
        ("threshold 0.9", {**ref, **b, "threshold": 0.9}),
        (
            "threshold 0.9 + prefix cache",
            {**ref, **b, "threshold": 0.9, "cache": "prefix"},
        ),
        ("threshold 0.9 + dual cache", dual9),
        ("prefix cache (reference steps)", {**ref, **b, "cache": "prefix"}),
        ("dual cache (reference steps)", {**ref, **b, "cache": "dual"}),
        ("factor 1.0 + dual cache", {**ref, **b, "factor": 1.0, "cache": "dual"}),
        # A stricter threshold: several calls per block, so the caches serve.
        ("threshold 0.999", {**ref, **b, "threshold": 0.999}),
        (
            "threshold 0.999 + prefix cache",
            {**ref, **b, "threshold": 0.999, "cache": "prefix"},
        ),
        (
            "threshold 0.999 + dual cache",
            {**ref, **b, "threshold": 0.999, "cache": "dual"},
        ),
    ]
    if gen_length > LONG_CANVAS:
        out = [(f"{n} + early stop", {**kw, "early_stop": True}) for n, kw in out]
        out.append(("threshold 0.9 + dual cache, whole canvas", dual9))
    else:
        out = [
            (f"reference (block {gen_length})", {**ref, **one}),
            *out[:1],
            (f"threshold 0.9 (block {gen_length})", {**ref, **one, "threshold": 0.9}),
            *out[1:4],
            ("threshold 0.9 + dual cache + early stop", {**dual9, "early_stop": True}),
            *out[4:],
        ]
    unique, seen = [], set()
    for name, kwargs in out:  # the same settings once (block == canvas)
        key = json.dumps(kwargs, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append((name, kwargs))
    return unique


def prompts(tokenizer, problems):
    """Chat-templated prompts, left-padded, with their attention mask."""
    encs = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
        )
        for q in problems
    ]
    encs = [list(e["input_ids"]) if isinstance(e, dict) else list(e) for e in encs]
    P = max(map(len, encs))
    pad = tokenizer.eos_token_id
    prompt = np.full((len(encs), P), pad, dtype=np.int32)
    mask = np.zeros((len(encs), P), dtype=np.int32)
    for i, e in enumerate(encs):
        prompt[i, P - len(e) :] = e
        mask[i, P - len(e) :] = 1
    return prompt, mask


def answers(tokenizer, canvas, end_ids):
    """The text of each row's answer: its tokens before the first end token."""
    out = []
    for row in canvas:
        row = row.tolist()
        cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
        out.append(tokenizer.decode(row[:cut]).strip())
    return out


def decode(model, tokenizer, problems, kwargs, end_ids):
    """Answers, per-problem NFE and the batch's NFE for one mode."""
    prompt, mask = prompts(tokenizer, problems)
    B, P = prompt.shape
    nfe = np.zeros(B, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    mask_id = model.diffusion.mask_token_id
    early = kwargs.get("early_stop", False)

    def on_step(st):
        for j in range(B):
            if not done[j] and len(st.committed[j]):
                nfe[j] += 1
            if early and not done[j]:
                gen = st.canvas[j, P:]
                masks = np.flatnonzero(gen == mask_id)
                first = masks[0] if len(masks) else len(gen)
                done[j] = bool(np.isin(gen[:first], list(end_ids)).any())

    out, batch_nfe = diffusion_generate(
        model,
        mx.array(prompt),
        attention_mask=mx.array(mask) if (mask == 0).any() else None,
        on_step=on_step,
        **kwargs,
    )
    canvas = np.array(out)[:, P:]
    return answers(tokenizer, canvas, end_ids), nfe, batch_nfe, canvas


def evaluate(model, tokenizer, task, problems, mode_list, check_single=0):
    spec = model.diffusion
    end_ids = set(spec.end_token_ids)
    truth = [task.answer(q) for q in problems]
    # The answer's tokens and its <|eot_id|>: what a call has to decide.
    answer_tokens = sum(
        len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in truth
    )
    rows = []
    for name, kwargs in mode_list:
        start = time.perf_counter()
        got, nfe, batch_nfe, canvas = decode(
            model, tokenizer, problems, kwargs, end_ids
        )
        seconds = time.perf_counter() - start
        right = sum(g == t for g, t in zip(got, truth))
        row = {
            "mode": name,
            "settings": kwargs,
            "correct": right,
            "problems": len(problems),
            "accuracy": right / len(problems),
            "mean_nfe": float(nfe.mean()),
            "max_nfe": int(nfe.max()),
            "tokens_per_call": kwargs["gen_length"] / float(nfe.mean()),
            "answer_tokens_per_call": answer_tokens / float(nfe.sum()),
            "batch_nfe": int(batch_nfe),
            "batch_seconds": round(seconds, 2),
        }
        if check_single:
            same_tokens = same_nfe = 0
            for j in range(min(check_single, len(problems))):
                _, n1, _, c1 = decode(
                    model, tokenizer, problems[j : j + 1], kwargs, end_ids
                )
                same_tokens += bool((c1[0] == canvas[j]).all())
                same_nfe += int(n1[0] == nfe[j])
            row["single_checked"] = min(check_single, len(problems))
            row["single_same_tokens"] = same_tokens
            row["single_same_nfe"] = same_nfe
        rows.append(row)
        print(
            f"{name:42s} acc {row['accuracy']:.3f}  NFE {row['mean_nfe']:5.2f}  "
            f"tok/call {row['tokens_per_call']:5.2f}  batch NFE {batch_nfe:3d}  "
            f"{seconds:6.1f} s"
            + (
                f"  single==batch {row['single_same_tokens']}/{row['single_checked']}"
                if check_single
                else ""
            ),
            flush=True,
        )
    return rows


def mlx_lm_generate_check(model, tokenizer, task, problems, max_tokens):
    """Answers through mlx-lm's own ``generate`` (the model's defaults)."""
    import mlx_lm

    right = 0
    for q in problems:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)
        right += text.strip() == task.answer(q)
    return right


def markdown(info, tables, generate_row):
    lines = [
        f"# {info['name']}: evaluation",
        "",
        f"Task: {info['task']}. Held-out set: {info['problems']} problems "
        f"(seed {info['heldout_seed']}), never seen in training. Canvas: the "
        "answer, `<|eot_id|>`, then `<|endoftext|>` padding; greedy "
        "(temperature 0). One left-padded batch with an attention mask.",
        "",
        f"Model: {info['model']}. Training: {info['training']}",
        "",
        "NFE = model calls per problem (calls that commit at least one of its "
        "tokens: what the problem needs alone). Tokens per call = canvas "
        "length / mean NFE (the padding included); answer tokens per call = "
        "(answer + `<|eot_id|>` tokens) / NFE. Batch NFE = calls made for the "
        "whole batch (its slowest row). With early stop the padding after the "
        "end token is filled without a call, and tokens per call counts it "
        "too. Seconds: the whole batch, on this CPU.",
        "",
    ]
    for table in tables:
        lines += _table(table)
    if generate_row:
        lines.append(
            f"Through `mlx_lm.generate` (the checkpoint's defaults, max_tokens "
            f"{generate_row['max_tokens']}): {generate_row['correct']}/"
            f"{generate_row['problems']} correct."
        )
        lines.append("")
    lines.append(
        f"The model was trained on answer canvases of {info['trained_canvases']} "
        "tokens; a longer canvas is outside what it learned."
    )
    lines.append("")
    lines.append(f"Reproduce: `{info['command']}`")
    lines.append("")
    return "\n".join(lines)


def _table(table):
    rows = table["modes"]
    lines = [
        f"## Canvas {table['gen_length']}, block {table['block_length']} "
        "unless the mode says otherwise",
        "",
        "| mode | accuracy | mean NFE | max NFE | tokens per call "
        "| answer tokens per call | batch NFE | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['correct']}/{r['problems']} ({100 * r['accuracy']:.1f}%) "
            f"| {r['mean_nfe']:.2f} | {r['max_nfe']} | {r['tokens_per_call']:.2f} "
            f"| {r['answer_tokens_per_call']:.2f} | {r['batch_nfe']} "
            f"| {r['batch_seconds']:.1f} |"
        )
    lines.append("")
    checked = [r for r in rows if "single_checked" in r]
    if checked:
        agree = all(
            r["single_same_tokens"] == r["single_checked"] == r["single_same_nfe"]
            for r in checked
        )
        lines.append(
            f"Batch against one problem at a time (first {checked[0]['single_checked']} "
            f"problems, every mode): "
            + (
                "same tokens and same per-problem NFE in every mode."
                if agree
                else "DIFFERENCES: "
                + "; ".join(
                    f"{r['mode']}: tokens {r['single_same_tokens']}/{r['single_checked']}, "
                    f"NFE {r['single_same_nfe']}/{r['single_checked']}"
                    for r in checked
                )
            )
        )
        lines.append("")
    return lines


def _span(lengths):
    return f"{min(lengths)} to {max(lengths)}" if len(lengths) > 1 else str(lengths[0])


def _stages(stages):
    """One sentence per training stage, with its command."""
    out = []
    for i, st in enumerate(stages, 1):
        batches = ", ".join(f"{n}: {b}" for n, b in st["batch_sizes"].items())
        out.append(
            f"stage {i}: {st['steps']} steps, answer canvases of "
            f"{_span(st['answer_lengths'])} tokens (sequences per batch by "
            f"canvas: {batches}), {st['train_seconds']:.0f} s on this CPU; "
            f"`{st['command']}`."
        )
    return " ".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="tests/fixtures/trained-sorter",
        help="checkpoint folder (relative to the repository root)",
    )
    p.add_argument("--problems", type=int, default=200)
    p.add_argument(
        "--canvases",
        nargs="+",
        default=["16:8", "256:32"],
        metavar="CANVAS:BLOCK",
        help="answer canvases to evaluate, each with its block length",
    )
    p.add_argument(
        "--check-single",
        type=int,
        default=20,
        help="decode this many problems one at a time too and compare",
    )
    p.add_argument(
        "--generate-problems",
        type=int,
        default=20,
        help="problems to answer through mlx_lm.generate (0: skip)",
    )
    p.add_argument(
        "--generate-max-tokens",
        type=int,
        default=256,
        help="max_tokens of the mlx_lm.generate check (256: mlx-lm's default)",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    import mlx_lm

    path = Path(args.model)
    if not path.is_absolute():
        path = ROOT / path
    with open(path / "training.json") as f:
        training = json.load(f)
    targs = training["args"]
    canvases = [tuple(int(v) for v in c.split(":")) for c in args.canvases]
    task = make_task(
        targs["task"], targs["max_digits"], targs["min_len"], targs["max_len"]
    )
    problems = heldout_problems(task, targs["heldout"], targs["heldout_seed"])
    problems = problems[: args.problems]

    model, tokenizer = mlx_lm.load(str(path))
    tables = []
    for gen_length, block_length in canvases:
        print(f"canvas {gen_length}, block {block_length}", flush=True)
        rows = evaluate(
            model,
            tokenizer,
            task,
            problems,
            modes(gen_length, block_length),
            check_single=args.check_single,
        )
        tables.append(
            {"gen_length": gen_length, "block_length": block_length, "modes": rows}
        )
    generate_row = None
    if args.generate_problems:
        n = min(args.generate_problems, len(problems))
        max_tokens = args.generate_max_tokens
        right = mlx_lm_generate_check(model, tokenizer, task, problems[:n], max_tokens)
        generate_row = {"correct": right, "problems": n, "max_tokens": max_tokens}
        print(f"mlx_lm.generate: {right}/{n} correct", flush=True)

    command = "python benchmarks/evaluate_trained.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    info = {
        "name": path.name,
        "task": training["task"],
        "problems": len(problems),
        "heldout_seed": targs["heldout_seed"],
        "trained_canvases": _span(training["stages"][-1]["answer_lengths"]),
        "model": (
            f"{training['parameters']:,} parameters (d_model {targs['d_model']}, "
            f"{targs['n_layers']} layers, {targs['n_heads']} heads, MLP "
            f"{targs['mlp_hidden']}, {targs['vocab_rows']} vocabulary rows), float32"
        ),
        "training": _stages(training["stages"]),
        "command": command.strip(),
    }
    if not args.no_write:
        result = {
            **info,
            "parameters": training["parameters"],
            "canvases": tables,
            "mlx_lm_generate": generate_row,
            "heldout": [[q, task.answer(q)] for q in problems],
        }
        with open(path / "evaluation.json", "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        with open(path / "EVALUATION.md", "w") as f:
            f.write(markdown(info, tables, generate_row))
        print(f"wrote {path / 'EVALUATION.md'} and evaluation.json")


if __name__ == "__main__":
    main()
