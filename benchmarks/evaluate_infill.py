#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Fill-in-the-middle on a trained LLaDA: a masked span of held-out answers.

Takes the checkpoint that ``train_tiny_llada.py`` wrote (the digit sorter)
and its fixed held-out problems (never trained on). For each problem it
lays out the right answer's canvas as the model was trained on it: the
chat-templated prompt, the sorted digits, ``<|eot_id|>``, then
``<|endoftext|>`` up to the canvas length. Then it masks a span in the
middle of the sorted digits and fills it with
``diffusion_generate(template=...)``:

- ``infill``: only the span is masked; the model sees the prompt, the
  digits before the span and everything after it (the rest of the answer,
  the end token, the padding);
- ``prefix only`` (the baseline): the span and everything after it is
  masked, so the model continues from the prompt and the digits before the
  span, and cannot see the rest. Only its span tokens are scored.

Spans (``--spans``, ``SPANS``): ``mid3``, the middle 3 digits (from
digit ``(n - 3) // 2`` of an ``n``-digit answer); ``inner``, every digit
but the first and the last.

Each is decoded with LLaDA's reference schedule (one token per step) and
with threshold 0.9 + dual cache, on each canvas of ``--canvases`` (by
default 16 and 256 tokens, the shortest and the longest trained; on the
long one both stop early, which leaves the spans unchanged).

Scored: exact match of the span (every token of it right), that every
token outside the gaps was kept, model calls (NFE, counted per problem as
in ``evaluate_trained.py``: calls that commit at least one of its tokens)
and wall time. The problems run as one left-padded batch with an attention
mask; a few also one at a time, to check that the batch changes nothing.
Writes ``benchmarks/results/infill-sorter.json`` and the checkpoint's
``INFILL.md``. On 2 CPU cores the whole run takes about 18 minutes, most
of it the baseline's reference schedule on the 256-token canvas;
``--canvases 16:8`` takes about a minute.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The repository (the package) and this folder (the training script's helpers).
sys.path[:0] = [p for p in (str(ROOT), str(HERE)) if p not in sys.path]

from evaluate_trained import LONG_CANVAS, prompts  # noqa: E402
from train_tiny_llada import EOT, heldout_problems, make_task  # noqa: E402

from mlx_lm_llada import diffusion_generate  # noqa: E402
from mlx_lm_llada.diffusion.loop import gap_spans  # noqa: E402

SORTER = "tests/fixtures/trained-sorter"
RESULTS = "benchmarks/results/infill-sorter.json"
SPANS = {
    "mid3": "the middle 3 digits (1 digit before them and 2 after in a "
    "6-digit answer, 2 and 2 in 7 digits, 2 and 3 in 8)",
    "inner": "every digit but the first and the last (4 to 6 digits)",
}


def span_of(n: int, kind: str):
    """Digits ``[start, end)`` of an ``n``-digit answer that ``kind`` masks."""
    if kind == "mid3":
        start = (n - 3) // 2
        return start, start + 3
    if kind == "inner":
        return 1, n - 1
    raise ValueError(f"unknown span {kind!r}: one of {', '.join(SPANS)}")


def settings(gen_length, block_length):
    """(name, diffusion_generate keyword arguments): the reference schedule
    (one token per step) and a fast mode. On a long canvas both stop early
    (as in ``evaluate_trained.py``): a token before the first end token is
    final once committed, so the spans are the same, and the padding after
    the end is not computed."""
    ref = dict(steps=gen_length, gen_length=gen_length, block_length=block_length)
    modes = [
        (f"reference (block {block_length})", ref),
        ("threshold 0.9 + dual cache", {**ref, "threshold": 0.9, "cache": "dual"}),
    ]
    if gen_length > LONG_CANVAS:
        modes = [(f"{n} + early stop", {**kw, "early_stop": True}) for n, kw in modes]
    return modes


def answer_canvases(tokenizer, task, problems, gen_length):
    """The right answers' canvases, as in training.

    Returns the left-padded prompts ``[B, P]``, their attention mask, the
    canvases ``[B, P + gen_length]`` (prompt, answer, ``<|eot_id|>``, then
    ``<|endoftext|>``) and each answer's digit count."""
    prompt, mask = prompts(tokenizer, problems)
    B, P = prompt.shape
    eot = tokenizer.convert_tokens_to_ids(EOT)
    canvas = np.full((B, P + gen_length), tokenizer.eos_token_id, dtype=np.int64)
    canvas[:, :P] = prompt
    lengths = []
    for j, q in enumerate(problems):
        answer = task.answer(q)
        ids = tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != len(answer):
            raise ValueError(f"{answer!r}: a digit is not one token ({ids})")
        if len(ids) + 1 > gen_length:
            raise ValueError(f"{answer!r} and its end do not fit in {gen_length}")
        canvas[j, P : P + len(ids) + 1] = ids + [eot]
        lengths.append(len(ids))
    return prompt, mask, canvas, lengths


def templates(canvas, P, lengths, kind, mask_id):
    """The infill and the prefix-only templates, and each row's span
    (canvas positions ``[a, b)``)."""
    infill, prefix = canvas.copy(), canvas.copy()
    spans = []
    for j, n in enumerate(lengths):
        start, end = span_of(n, kind)
        a, b = P + start, P + end
        infill[j, a:b] = mask_id
        prefix[j, a:] = mask_id
        spans.append((a, b))
    return infill, prefix, spans


def fill(model, prompt, mask, template, kwargs):
    """diffusion_generate from ``template``: the canvas, NFE per row, the
    batch's NFE and seconds.

    A call counts for a row when it commits at least one of its tokens,
    until the row's own early stop (if on): every gap of the row filled, or
    ended by an end token with everything before it committed."""
    kwargs = dict(kwargs)
    early = kwargs.pop("early_stop", False)
    spec = model.diffusion
    mask_id, end_ids = spec.mask_token_id, list(spec.end_token_ids)
    B = template.shape[0]
    nfe = np.zeros(B, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    gaps = [gap_spans(row == mask_id) for row in template]

    def ended(row, a, b):
        masks = np.flatnonzero(row[a:b] == mask_id)
        return not len(masks) or bool(np.isin(row[a : a + masks[0]], end_ids).any())

    def on_step(st):
        for j in np.flatnonzero(~done):
            nfe[j] += len(st.committed[j]) > 0
            if early:
                done[j] = all(ended(st.canvas[j], a, b) for a, b in gaps[j])

    padded = (mask == 0).any()
    start = time.perf_counter()
    out, batch_nfe = diffusion_generate(
        model,
        mx.array(prompt),
        template=mx.array(template),
        attention_mask=mx.array(mask) if padded else None,
        early_stop=early,
        on_step=on_step,
        **kwargs,
    )
    return np.array(out), nfe, int(batch_nfe), time.perf_counter() - start


def score(out, canvas, template, spans, mask_id):
    """Per row: the span right, and the tokens outside the gaps kept."""
    right = np.array(
        [(out[j, a:b] == canvas[j, a:b]).all() for j, (a, b) in enumerate(spans)]
    )
    fixed = template != mask_id
    kept = ((out == template) | ~fixed).all(axis=1)
    return right, kept


def _text(tokenizer, ids):
    return tokenizer.decode([int(t) for t in ids])


def check_single(model, prompt, mask, template, kwargs, out, nfe, n):
    """Fill the first ``n`` rows one at a time, without their padding: how
    many get the batch's tokens and the batch's NFE."""
    same = 0
    for j in range(min(n, len(template))):
        keep = mask[j] == 1
        row = np.concatenate([keep, np.ones(template.shape[1] - len(keep), bool)])
        one, one_nfe, _, _ = fill(
            model,
            prompt[j : j + 1, keep],
            mask[j : j + 1, keep],
            template[j : j + 1, row],
            kwargs,
        )
        same += int((one[0] == out[j, row]).all() and one_nfe[0] == nfe[j])
    return same


def evaluate(model, tokenizer, task, problems, gen_length, block_length, kinds, single):
    mask_id = model.diffusion.mask_token_id
    prompt, mask, canvas, lengths = answer_canvases(
        tokenizer, task, problems, gen_length
    )
    P = prompt.shape[1]
    rows = []
    for kind in kinds:
        infill, prefix, spans = templates(canvas, P, lengths, kind, mask_id)
        for name, kwargs in settings(gen_length, block_length):
            row = {"span": kind, "mode": name, "settings": kwargs}
            right = {}
            for which, template in (("infill", infill), ("prefix_only", prefix)):
                out, nfe, batch_nfe, seconds = fill(
                    model, prompt, mask, template, kwargs
                )
                right[which], kept = score(out, canvas, template, spans, mask_id)
                ok = right[which]
                r = row[which] = {
                    "correct": int(ok.sum()),
                    "problems": len(problems),
                    "exact_match": float(ok.mean()),
                    "fixed_tokens_kept": int(kept.sum()),
                    "mean_nfe": float(nfe.mean()),
                    "max_nfe": int(nfe.max()),
                    "batch_nfe": batch_nfe,
                    "batch_seconds": round(seconds, 2),
                    "wrong": [
                        {
                            "question": problems[j],
                            "answer": task.answer(problems[j]),
                            "span": _text(tokenizer, canvas[j, a:b]),
                            "filled": _text(tokenizer, out[j, a:b]),
                        }
                        for j, (a, b) in enumerate(spans)
                        if not ok[j]
                    ],
                }
                line = (
                    f"{kind:5s} {name:28s} {which:11s} span {ok.sum():3d}/"
                    f"{len(problems)}  kept {kept.sum():3d}  NFE {nfe.mean():5.2f}  "
                    f"batch NFE {batch_nfe:3d}  {seconds:6.1f} s"
                )
                if single:
                    r["single_checked"] = min(single, len(problems))
                    r["single_same"] = check_single(
                        model, prompt, mask, template, kwargs, out, nfe, single
                    )
                    line += f"  single==batch {r['single_same']}/{r['single_checked']}"
                print(line, flush=True)
            a, b = right["infill"], right["prefix_only"]
            row["only_infill_right"] = int((a & ~b).sum())
            row["only_prefix_only_right"] = int((~a & b).sum())
            rows.append(row)
    return rows


def markdown(info, tables):
    lines = [
        f"# {info['name']}: fill-in-the-middle",
        "",
        f"Task: {info['task']}. Held-out set: {info['problems']} problems "
        f"(seed {info['heldout_seed']}), never seen in training. Model: "
        f"{info['model']}.",
        "",
        "Each problem's right answer is laid out as the model was trained on "
        "it: the chat-templated prompt, the sorted digits, `<|eot_id|>`, then "
        "`<|endoftext|>` up to the canvas length. A span in the middle of the "
        "sorted digits is masked and filled with "
        "`diffusion_generate(template=...)`, greedy (temperature 0):",
        "",
        "- **infill**: only the span is masked; the model sees the prompt, the "
        "digits before the span and everything after it;",
        "- **prefix only** (baseline): the span and everything after it are "
        "masked, so the same model continues from the prompt and the digits "
        "before the span and cannot see the rest; only its span is scored.",
        "",
        "Spans: "
        + "; ".join(f"`{k}`, {SPANS[k]}" for k in info["spans"])
        + f". Exact match = every token of the span right. NFE = model calls "
        "per problem (calls that commit at least one of its tokens, until its "
        "own early stop); batch NFE = calls for the whole batch. Seconds: the "
        "whole batch (one left-padded batch with an attention mask), on "
        f"{info['machine']}; they depend on what else the machine runs, the "
        "model calls do not.",
        "",
        "The prompt alone determines the sorted digits, so the baseline lacks "
        "no information about them; what the infill adds is the rest of the "
        "answer: the digits after the span, the span's length and where the "
        "answer ends.",
        "",
    ]
    for table in tables:
        lines += [
            f"## Canvas {table['gen_length']}, block {table['block_length']}",
            "",
            "| span | mode | infill exact match | prefix-only exact match "
            "| only infill right | only prefix-only right | NFE infill "
            "| NFE prefix-only | batch NFE infill / prefix-only "
            "| seconds infill / prefix-only |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table["rows"]:
            a, b = r["infill"], r["prefix_only"]
            lines.append(
                f"| `{r['span']}` | {r['mode']} | {_rate(a)} | {_rate(b)} "
                f"| {r['only_infill_right']} | {r['only_prefix_only_right']} "
                f"| {a['mean_nfe']:.2f} | {b['mean_nfe']:.2f} "
                f"| {a['batch_nfe']} / {b['batch_nfe']} "
                f"| {a['batch_seconds']:.1f} / {b['batch_seconds']:.1f} |"
            )
        lines.append("")
    runs = [r[w] for t in tables for r in t["rows"] for w in ("infill", "prefix_only")]
    kept = all(r["fixed_tokens_kept"] == r["problems"] for r in runs)
    lines.append(
        "Tokens outside the gaps: "
        + (
            "unchanged in every row of every run."
            if kept
            else "CHANGED in some rows: "
            + ", ".join(f"{r['fixed_tokens_kept']}/{r['problems']} kept" for r in runs)
        )
    )
    checked = [r for r in runs if r.get("single_checked")]
    if checked:
        lines.append("")
        same = all(r["single_same"] == r["single_checked"] for r in checked)
        lines.append(
            f"Batch against one problem at a time (first "
            f"{checked[0]['single_checked']} problems, every run): "
            + (
                "same tokens and same per-problem NFE."
                if same
                else "DIFFERENCES: "
                + ", ".join(
                    f"{r['single_same']}/{r['single_checked']}" for r in checked
                )
            )
        )
    wrong = [
        (t["gen_length"], r["span"], r["mode"], w, x)
        for t in tables
        for r in t["rows"]
        for w in ("infill", "prefix_only")
        for x in r[w]["wrong"]
    ]
    if wrong:
        lines += [
            "",
            "Wrong spans (canvas, span, mode, run: question, right span -> filled):",
            "",
        ]
        lines += [
            f"- {g}, `{k}`, {m}, {w.replace('_', ' ')}: `{x['question']}`, "
            f"`{x['span']}` -> `{x['filled']}`"
            for g, k, m, w, x in wrong
        ]
    lines += [
        "",
        f"Whole run: {info['wall_seconds']:.0f} s. Results: "
        f"`{info['results']}`. Reproduce (on Linux with OpenBLAS preloaded, "
        f"as `benchmarks/README.md` says): `{info['command']}`",
        "",
    ]
    return "\n".join(lines)


def _rate(r):
    return f"{r['correct']}/{r['problems']} ({100 * r['exact_match']:.1f}%)"


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Exact match of a masked span of the trained sorter's "
        "held-out answers, filled with the rest of the answer in view (infill) "
        "or from its prefix alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--model", default=SORTER, help="checkpoint (relative to the repository)")
    add("--problems", type=int, default=200, help="first held-out problems")
    add(
        "--canvases",
        nargs="+",
        default=["16:8", "256:32"],
        metavar="CANVAS:BLOCK",
        help="answer canvases, each with its block length",
    )
    add(
        "--spans",
        nargs="+",
        choices=list(SPANS),
        default=list(SPANS),
        help="; ".join(f"{k}: {v}" for k, v in SPANS.items()),
    )
    add("--check-single", type=int, default=8, help="also fill one at a time")
    add("--out", default=RESULTS, help="results (relative to the repository)")
    add("--no-write", action="store_true", help="print only")
    add("--render", action="store_true", help="only rewrite INFILL.md from --out")
    return p.parse_args(argv)


def load_sorter(checkpoint):
    """The model, its tokenizer, its task, its held-out problems and its
    ``training.json``."""
    import mlx_lm

    training = json.loads((checkpoint / "training.json").read_text())
    a = training["args"]
    task = make_task(a["task"], a["max_digits"], a["min_len"], a["max_len"])
    if task.name != "sort":
        raise SystemExit(f"{checkpoint}: spans of sorted digits need the sort task")
    heldout = heldout_problems(task, a["heldout"], a["heldout_seed"])
    return (*mlx_lm.load(str(checkpoint)), task, heldout, training)


def machine(load_at_start):
    import platform

    blas = "openblas" in os.environ.get("LD_PRELOAD", "")
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX "
        f"{mx.__version__} ({mx.default_device()}"
        f"{', OpenBLAS preloaded' if blas else ''}), load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )


def main(argv=None):
    args = parse_args(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    checkpoint = ROOT / args.model  # an absolute --model stays as it is
    if args.render:
        document = json.loads((ROOT / args.out).read_text())
        (checkpoint / "INFILL.md").write_text(markdown(document, document["canvases"]))
        return
    model, tokenizer, task, heldout, training = load_sorter(checkpoint)
    problems = heldout[: args.problems]

    sorter = (model, tokenizer, task, problems)

    def table(canvas):
        gen_length, block_length = map(int, canvas.split(":"))
        print(f"canvas {gen_length}, block {block_length}", flush=True)
        rows = evaluate(
            *sorter, gen_length, block_length, args.spans, args.check_single
        )
        return dict(gen_length=gen_length, block_length=block_length, rows=rows)

    tables = [table(canvas) for canvas in args.canvases]

    given = sys.argv[1:] if argv is None else argv
    info = dict(
        name=checkpoint.name,
        task=training["task"],
        problems=len(problems),
        heldout_seed=training["args"]["heldout_seed"],
        model=f"{training['parameters']:,} parameters, float32",
        spans=args.spans,
        machine=machine(load_at_start),
        results=args.out,
        command=" ".join(["python benchmarks/evaluate_infill.py", *given]),
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    print(f"whole run {info['wall_seconds']:.0f} s", flush=True)
    if not args.no_write:
        results = ROOT / args.out
        results.parent.mkdir(parents=True, exist_ok=True)
        document = {**info, "span_kinds": SPANS, "canvases": tables}
        results.write_text(json.dumps(document, indent=1) + "\n")
        (checkpoint / "INFILL.md").write_text(markdown(info, tables))
        print(f"wrote {results} and {checkpoint / 'INFILL.md'}")


if __name__ == "__main__":
    main()
