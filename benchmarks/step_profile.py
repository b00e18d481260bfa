#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Where one denoising step's time goes, for a LLaDA checkpoint or shape.

Decodes prompts with the one loop (``diffusion_generate``, LLaDA's
arguments) in the given settings and splits the wall time of the calls:

- **model body**: the embedding and the transformer layers of each call
  (evaluated before the output head starts);
- **output head**: the final norm and the vocabulary projection, for the
  positions whose logits the call returns;
- **post-processing on the device**: log-probabilities, the sampler and
  the confidences (the loop's ``mx.eval`` after the model call);
- **host transfers**: MLX arrays copied into NumPy (the loop's ``np.array``
  on an MLX array), and NumPy arrays into MLX (its ``mx.array`` on NumPy);
- **loop (Python, NumPy)**: everything else: the commit rules, the
  canvas bookkeeping, early stop.

Each model call is evaluated where it returns, so that its time is its own;
the loop evaluates it there anyway. Calls are split by kind: a block's
first call (the whole visible canvas) and the calls after it.

``--model`` takes a trained checkpoint and its held-out problems
(``heldout.jsonl``); ``--geometry`` a random-weight shape of
``diffusion_vs_autoregressive.py`` (LLaDA-8B's scaled: every call commits one
token, so ``--calls`` limits the run). Run it with OpenBLAS preloaded.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from mlx_lm_llada import diffusion_generate  # noqa: E402
from mlx_lm_llada.diffusion import loop  # noqa: E402


class Stop(Exception):
    pass


def instrument(model):
    """Time each model call (body and head apart); returns the list that
    collects ``[positions in, body seconds, head seconds]`` per call."""
    calls = []
    head = model.head
    spent = {}

    def timed_head(h):
        mx.eval(h)
        tic = time.perf_counter()
        out = head(h)
        mx.eval(out)
        spent["head"] = time.perf_counter() - tic
        return out

    class Timed(model.__class__):
        def __call__(self, inputs, *args, **kwargs):
            tic = time.perf_counter()
            out = super().__call__(inputs, *args, **kwargs)
            mx.eval(out)
            total = time.perf_counter() - tic
            calls.append([inputs.shape[1], total - spent["head"], spent["head"]])
            return out

    model.head = timed_head
    model.__class__ = Timed
    return calls


class _Timed:
    """A module seen through the loop's name for it, with some functions
    timed into ``spent[key]``: ``{name: (key, condition on the argument)}``."""

    def __init__(self, module, timed, spent):
        self._module, self._timed, self._spent = module, timed, spent

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if name not in self._timed:
            return value
        key, applies = self._timed[name]

        def timed(*args, **kwargs):
            if args and not applies(args[0]):
                return value(*args, **kwargs)
            tic = time.perf_counter()
            out = value(*args, **kwargs)
            self._spent[key] += time.perf_counter() - tic
            return out

        return timed


def profile(model, calls, prompts, settings, calls_limit=None):
    """Per-kind milliseconds, calls and positions; the per-call split."""
    del calls[:]
    first = []  # per call: is it its block's first
    tokens = 0
    spent = {"device": 0.0, "to host": 0.0, "to device": 0.0}

    def on_step(step):
        first.append(step.step == 0)
        if calls_limit and step.nfe >= calls_limit:
            raise Stop

    # The loop's mx.eval (its post-processing), mx.array on NumPy (to the
    # device) and np.array on MLX arrays (to the host), timed.
    is_mlx = lambda a: isinstance(a, mx.array)  # noqa: E731
    shims = dict(
        mx=_Timed(
            mx,
            {
                "eval": ("device", lambda a: True),
                "array": ("to device", lambda a: not is_mlx(a)),
            },
            spent,
        ),
        np=_Timed(np, {"array": ("to host", is_mlx)}, spent),
    )
    originals = {k: getattr(loop, k) for k in shims}
    for k, v in shims.items():
        setattr(loop, k, v)
    tic = time.perf_counter()
    try:
        for prompt in prompts:
            try:
                out, _ = diffusion_generate(model, prompt, on_step=on_step, **settings)
                gen = np.array(out)[0, prompt.shape[1] :]
                ends = np.flatnonzero(np.isin(gen, model.diffusion.end_token_ids))
                tokens += int(ends[0]) if len(ends) else len(gen)
            except Stop:
                tokens += calls_limit  # random weights: one token a call
    finally:
        for k, v in originals.items():
            setattr(loop, k, v)
    wall = time.perf_counter() - tic
    device_post, host = spent["device"], spent["to host"] + spent["to device"]
    c = np.array(calls, dtype=np.float64).reshape(-1, 3)
    is_first = np.array(first[: len(c)], dtype=bool)
    model_total = c[:, 1:].sum()
    rest = wall - model_total - device_post - host
    n = len(c)
    kinds = {}
    for name, rows in (
        ("first call of a block", c[is_first]),
        ("later call", c[~is_first]),
    ):
        if len(rows):
            kinds[name] = dict(
                calls=len(rows),
                positions_in=float(rows[:, 0].mean()),
                model_body_ms=1e3 * float(rows[:, 1].mean()),
                output_head_ms=1e3 * float(rows[:, 2].mean()),
            )
    return dict(
        wall_seconds=wall,
        calls=n,
        answer_tokens=tokens,
        tokens_per_call=tokens / n,
        tokens_per_second=tokens / wall,
        per_kind=kinds,
        per_call_ms=dict(
            model_body=1e3 * c[:, 1].sum() / n,
            output_head=1e3 * c[:, 2].sum() / n,
            device_post_processing=1e3 * device_post / n,
            host_transfers=1e3 * host / n,
            loop_python_numpy=1e3 * rest / n,
        ),
    )


def checkpoint_prompts(path, n):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    heldout = Path(path) / "heldout.jsonl"
    if heldout.exists():
        questions = [json.loads(line)["prompt"] for line in heldout.open()]
    else:  # the sorter's: (question, answer) pairs in evaluation.json
        evaluation = json.loads((Path(path) / "evaluation.json").read_text())
        questions = [q for q, _ in evaluation["heldout"]]
    prompts = []
    for q in questions[:n]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        prompts.append(mx.array([ids]))
    return model, prompts


def geometry_prompts(name, prompt_length, n):
    from diffusion_vs_autoregressive import GEOMETRIES

    g = GEOMETRIES[name]
    model = g["model"](g["shape"], mx.float32, 0)
    mx.random.seed(0)
    vocab = g["shape"]["vocab"]
    return model, [
        mx.random.randint(0, vocab - 256, (1, prompt_length)) for _ in range(n)
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        help="a trained checkpoint with heldout.jsonl (or the sorter's evaluation.json)",
    )
    p.add_argument("--geometry", help="a random-weight shape instead")
    p.add_argument("--problems", type=int, default=10)
    p.add_argument("--prompt-length", type=int, default=300, help="--geometry")
    p.add_argument("--calls", type=int, help="stop each prompt after this many")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument(
        "--settings",
        default='{"threshold": 0.9, "cache": "dual"}',
        help="diffusion_generate arguments (JSON), besides the canvas",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.model:
        model, prompts = checkpoint_prompts(args.model, args.problems)
    else:
        model, prompts = geometry_prompts(
            args.geometry, args.prompt_length, args.problems
        )
    settings = dict(
        steps=args.gen_length,
        gen_length=args.gen_length,
        block_length=args.block_length,
        early_stop=True,
        **json.loads(args.settings),
    )
    calls = instrument(model)
    # One warm-up prompt (MLX compiles kernels on first use), not counted.
    profile(model, calls, prompts[:1], settings, args.calls)
    result = profile(model, calls, prompts, settings, args.calls)
    result.update(
        source=str(args.model or args.geometry),
        settings=settings,
        problems=len(prompts),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
