#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Teach the trained sorter a new operator with ``mlx_lm.lora`` and measure it.

The fixture ``tests/fixtures/trained-sorter`` answers ``"sort 46465691"``
with ``"14456669"``. It has never seen ``"rsort"`` (sort descending:
``"rsort 46465691"`` -> ``"96665441"``); the word tokenizes as ``r`` +
``sort``, and the base model answers it in ascending order. This script:

1. writes ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` in mlx-lm's
   chat format (``{"messages": [user, assistant]}``). The held-out set is the
   fixture's own (``heldout_problems``: 200 digit strings, seed 1234, never
   trained on by the fixture); ``rsort`` is asked on the same strings, and no
   training or validation question uses one of them;
2. measures held-out exact match of the base model on ``rsort`` and on the
   original ``sort``;
3. runs the unchanged ``mlx_lm.lora`` command (LoRA on all 4 layers, prompt
   masked, the masked-diffusion loss that mlx-lm-llada puts behind mlx-lm's
   trainer) as a subprocess, timed; once per ``--replay`` fraction of
   training questions that ask the old ``sort`` (by default 0, ``rsort``
   only, and 0.5);
4. measures both tasks again with the adapter (``mlx_lm.load(...,
   adapter_path=...)``): what was learned, and what was forgotten; the
   intermediate checkpoints (``--save-every``) with the first decoding.

Decodings: the reference schedule (``mlx_lm_llada.diffusion_generate``:
greedy, one token per step, low-confidence remasking; the problems as
left-padded batches) on each canvas of ``--canvases`` (64 tokens: about the
canvas that fine-tuning sees, as mlx-lm pads a batch of these 35-37-token
rows to 65 tokens; 16: the shortest the fixture was trained on); and the
model's defaults through ``mlx_lm.stream_generate`` (what ``mlx_lm.generate``
does: mlx-lm's 256-token ``max_tokens``, dual cache, threshold 0.9, early
stop), one problem at a time. An answer is the text before the first end
token (``<|eot_id|>`` or ``<|endoftext|>``), compared exactly.

The data and the adapters go to a temporary folder (``--work-dir`` to keep
them elsewhere); results to ``benchmarks/results/lora-new-operator.json``.

On the CPU backend, preload OpenBLAS for speed (Debian:
``libopenblas0-pthread``)::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/lora_new_operator.py
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from evaluate_trained import answers, prompts  # noqa: E402
from train_tiny_llada import Sorting, heldout_problems  # noqa: E402

from mlx_lm_llada import diffusion_generate  # noqa: E402


class ReverseSorting(Sorting):
    """``"rsort 5281390"`` -> ``"9853210"``: the new operator."""

    name = "rsort"

    def __init__(self, min_len=6, max_len=8):
        super().__init__(min_len, max_len)
        self.description = (
            f"sorting a string of {min_len} to {max_len} digits in descending order"
        )

    def sample(self, rng, n):
        return ["r" + q for q in super().sample(rng, n)]

    def answer(self, question):
        return "".join(sorted(question.split()[-1], reverse=True))

    def longest(self):
        return "r" + super().longest()


def digits(question):
    return question.split()[-1]


def draw(task, rng, n, exclude):
    """``n`` distinct questions whose digit strings are not in ``exclude``;
    their digit strings are added to ``exclude``."""
    out = []
    while len(out) < n:
        for q in task.sample(rng, n):
            if digits(q) not in exclude and len(out) < n:
                exclude.add(digits(q))
                out.append(q)
    return out


def write_jsonl(path, pairs):
    """mlx-lm's chat format: one ``{"messages": [user, assistant]}`` a line."""
    with open(path, "w") as f:
        for question, answer in pairs:
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def write_data(folder, new_task, old_task, heldout, n_train, n_valid, replay, seed):
    """train/valid/test.jsonl. A fraction ``replay`` of the training
    questions ask the old operator (0: the new one only); valid asks the new
    one; test is the held-out set with the new operator."""
    rng = np.random.default_rng(seed)
    exclude = {digits(q) for q in heldout}
    n_old = int(round(replay * n_train))
    train = [
        (q, new_task.answer(q)) for q in draw(new_task, rng, n_train - n_old, exclude)
    ]
    train += [(q, old_task.answer(q)) for q in draw(old_task, rng, n_old, exclude)]
    rng.shuffle(train)
    valid = draw(new_task, rng, n_valid, exclude)
    test = [f"{new_task.name} {digits(q)}" for q in heldout]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "valid.jsonl", [(q, new_task.answer(q)) for q in valid])
    write_jsonl(folder / "test.jsonl", [(q, new_task.answer(q)) for q in test])
    return {"train": len(train), "train_old_operator": n_old, "valid": len(valid)}


def reference_accuracy(model, tokenizer, task, problems, canvas, block, batch=100):
    """Exact match with the reference schedule, the problems in batches."""
    end_ids = set(model.diffusion.end_token_ids)
    got = []
    for s in range(0, len(problems), batch):
        chunk = problems[s : s + batch]
        prompt, mask = prompts(tokenizer, chunk)
        out, _ = diffusion_generate(
            model,
            mx.array(prompt),
            attention_mask=mx.array(mask) if (mask == 0).any() else None,
            steps=canvas,
            gen_length=canvas,
            block_length=block,
        )
        got += answers(tokenizer, np.array(out)[:, prompt.shape[1] :], end_ids)
    return score(task, problems, got)


def defaults_accuracy(model, tokenizer, task, problems, max_tokens):
    """Exact match through ``mlx_lm.stream_generate`` (the model's defaults);
    the answer is the text before the first end token."""
    import mlx_lm

    end_ids = set(model.diffusion.end_token_ids)
    got = []
    for q in problems:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        ids = []
        for r in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens
        ):
            if r.token in end_ids:
                break
            ids.append(r.token)
        got.append(tokenizer.decode(ids).strip())
    return score(task, problems, got)


def score(task, problems, got):
    right = [g == task.answer(q) for q, g in zip(problems, got)]
    return {
        "correct": int(sum(right)),
        "problems": len(problems),
        "accuracy": sum(right) / len(problems),
        "examples": [[q, g] for q, g in zip(problems[:5], got[:5])],
    }


def decodings(args):
    """(name, settings) of each decoding evaluated."""
    out = [
        (
            f"reference, canvas {c}",
            {"schedule": "reference", "gen_length": c, "block_length": b},
        )
        for c, b in (tuple(int(v) for v in cb.split(":")) for cb in args.canvases)
    ]
    if args.defaults_problems:
        out.append(
            (
                f"defaults, max_tokens {args.defaults_max_tokens}",
                {"schedule": "defaults", "max_tokens": args.defaults_max_tokens},
            )
        )
    return out


def evaluate(model_path, adapter_path, tasks, modes, args):
    """Every decoding of every task, through ``mlx_lm.load``."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(
        model_path, adapter_path=str(adapter_path) if adapter_path else None
    )
    model.eval()
    out = {}
    for task, problems in tasks:
        row = {}
        for name, kw in modes:
            start = time.perf_counter()
            if kw["schedule"] == "reference":
                r = reference_accuracy(
                    model,
                    tokenizer,
                    task,
                    problems,
                    kw["gen_length"],
                    kw["block_length"],
                )
            else:
                r = defaults_accuracy(
                    model,
                    tokenizer,
                    task,
                    problems[: args.defaults_problems],
                    kw["max_tokens"],
                )
            r["seconds"] = round(time.perf_counter() - start, 1)
            row[name] = r
        out[task.name] = row
        print(
            f"  {task.name:6s} "
            + "  ".join(f"{k}: {v['correct']}/{v['problems']}" for k, v in row.items())
            + f"   e.g. {r['examples'][0]}",
            flush=True,
        )
    return out


def checkpoint(adapter, iteration, folder):
    """An adapter folder for the trainer's checkpoint at ``iteration``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter / "adapter_config.json", folder)
    shutil.copy(
        adapter / f"{iteration:07d}_adapters.safetensors",
        folder / "adapters.safetensors",
    )
    return folder


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def train(args, work, replay, new_task, old_task, heldout, tasks, modes, model_path):
    """One fine-tuning run: its data, ``mlx_lm.lora``, the evaluations."""
    folder = work / f"replay-{replay:g}"
    data, adapter = folder / "data", folder / "adapter"
    counts = write_data(
        data,
        new_task,
        old_task,
        heldout,
        args.train_examples,
        args.valid_examples,
        replay,
        args.data_seed,
    )
    print(f"\nrun: replay {replay:g}; data in {data}: {counts}", flush=True)
    cmd = lora_command(args, data, adapter)
    shown = " ".join(["mlx_lm.lora"] + cmd[1:])
    print(f"$ {shown}", flush=True)
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = []
    for line in proc.stdout:
        line = ANSI.sub("", line)
        print("  | " + line, end="", flush=True)
        log.append(line)
    if proc.wait():
        raise SystemExit(f"mlx_lm.lora failed ({proc.returncode})")
    train_seconds = time.perf_counter() - start
    load_after = load_average()
    log = "".join(log)
    (folder / "lora.log").write_text(log)
    print(f"trained in {train_seconds:.0f} s", flush=True)

    curve = []
    every = args.save_every or args.iters
    for it in range(every, args.iters, every):
        print(f"checkpoint {it}", flush=True)
        ckpt = checkpoint(adapter, it, folder / f"checkpoint-{it}")
        curve.append(
            {"iteration": it, **evaluate(str(model_path), ckpt, tasks, modes[:1], args)}
        )
    print(f"base model + adapter ({args.iters} iterations)", flush=True)
    after = evaluate(str(model_path), adapter, tasks, modes, args)
    curve.append(
        {
            "iteration": args.iters,
            **{t: {modes[0][0]: r[modes[0][0]]} for t, r in after.items()},
        }
    )
    return {
        "replay": replay,
        "data": counts,
        "command": shown.replace(str(data), "DATA").replace(str(adapter), "ADAPTER"),
        "train_seconds": round(train_seconds, 1),
        "load_average_before_after": [load_before, load_after],
        "training": parse_log(log),
        "after": after,
        "curve": curve,
    }


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_log(log):
    """The trainer's reported losses (its table: ``iter  train_loss  tok/s
    tokens`` and ``iter  val  loss``) and the trainable parameters."""
    number = r"([0-9.]+|nan|inf)"
    train = [
        (int(i), float(v))
        for i, v in re.findall(rf"^\s*(\d+)\s+{number}\s*\S?\s+[\d,]+\s", log, re.M)
    ]
    val = [
        (int(i), float(v))
        for i, v in re.findall(rf"^\s*(\d+)\s+val\s+{number}", log, re.M)
    ]
    m = re.search(r"Trainable parameters: ([0-9.]+)% \(([0-9.]+)M/([0-9.]+)M\)", log)
    trainable = (
        {"percent": float(m[1]), "millions": float(m[2]), "of_millions": float(m[3])}
        if m
        else None
    )
    return {"train_loss": train, "val_loss": val, "trainable_parameters": trainable}


def lora_command(args, data, adapter):
    exe = shutil.which("mlx_lm.lora") or str(
        Path(sys.executable).parent / "mlx_lm.lora"
    )
    return [
        exe,
        "--model",
        args.model,
        "--train",
        "--data",
        str(data),
        "--mask-prompt",
        "--num-layers",
        str(args.num_layers),
        "--learning-rate",
        str(args.learning_rate),
        "--batch-size",
        str(args.batch_size),
        "--iters",
        str(args.iters),
        "--steps-per-report",
        str(args.steps_per_report),
        "--steps-per-eval",
        str(args.steps_per_eval),
        "--val-batches",
        str(args.val_batches),
        "--save-every",
        str(args.save_every or args.iters),
        "--seed",
        str(args.seed),
        "--adapter-path",
        str(adapter),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="tests/fixtures/trained-sorter")
    p.add_argument(
        "--work-dir",
        help="data and adapters folder (default: a new temporary folder)",
    )
    p.add_argument("--out", default="benchmarks/results/lora-new-operator.json")
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--valid-examples", type=int, default=200)
    p.add_argument(
        "--replay",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        help="one run for each: the fraction of training questions that ask "
        "the old 'sort' (0: 'rsort' only)",
    )
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--steps-per-report", type=int, default=250)
    p.add_argument("--steps-per-eval", type=int, default=500)
    p.add_argument("--val-batches", type=int, default=10)
    p.add_argument(
        "--save-every",
        type=int,
        default=1000,
        help="checkpoints, each evaluated with the first decoding (0: the end only)",
    )
    p.add_argument("--seed", type=int, default=0, help="mlx_lm.lora --seed")
    p.add_argument("--problems", type=int, default=200, help="held-out problems")
    p.add_argument(
        "--canvases",
        nargs="+",
        default=["64:32", "16:8"],
        metavar="CANVAS:BLOCK",
        help="reference-schedule decodings: answer canvas and block length",
    )
    p.add_argument(
        "--defaults-problems",
        type=int,
        default=200,
        help="problems decoded with the model's defaults (0: skip)",
    )
    p.add_argument("--defaults-max-tokens", type=int, default=256)
    args = p.parse_args(argv)

    model_path = Path(args.model)
    if not model_path.is_absolute():
        model_path = ROOT / model_path
    with open(model_path / "training.json") as f:
        targs = json.load(f)["args"]
    old_task = Sorting(targs["min_len"], targs["max_len"])
    new_task = ReverseSorting(targs["min_len"], targs["max_len"])
    heldout = heldout_problems(old_task, targs["heldout"], targs["heldout_seed"])
    heldout = heldout[: args.problems]
    heldout_new = [new_task.name + " " + digits(q) for q in heldout]
    tasks = [(new_task, heldout_new), (old_task, heldout)]
    modes = decodings(args)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora-new-operator-"))
    print(f"held-out: {len(heldout)} problems; work folder {work}", flush=True)
    print("base model", flush=True)
    before = evaluate(str(model_path), None, tasks, modes, args)
    runs = [
        train(args, work, r, new_task, old_task, heldout, tasks, modes, model_path)
        for r in args.replay
    ]

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.system()}, "
        f"{os.cpu_count()} CPUs",
        "mlx": mx.__version__,
        "model": args.model,
        "new_operator": new_task.description + " ('rsort DIGITS')",
        "old_operator": old_task.description + " ('sort DIGITS')",
        "heldout": (
            f"the fixture's {len(heldout)} held-out digit strings (seed "
            f"{targs['heldout_seed']}), asked with each operator; no training "
            "or validation question uses one of them"
        ),
        "decodings": {
            "reference": "diffusion_generate, the reference schedule: steps = "
            "gen_length (one token per step), greedy, low-confidence remasking; "
            "the problems as left-padded batches of 100",
            "defaults": "mlx_lm.stream_generate with the model's defaults (dual "
            "cache, threshold 0.9, early stop, blocks of 32), one problem at a "
            "time",
            "answer": "the text before the first end token, exact match",
            "modes": dict(modes),
        },
        "before": before,
        "runs": runs,
        "script": "python benchmarks/lora_new_operator.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out}; data and adapters in {work}", flush=True)


if __name__ == "__main__":
    main()
