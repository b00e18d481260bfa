"""The worked-arithmetic fixtures: a LLaDA and its autoregressive twin.

``tests/fixtures/trained-arith`` is a tiny LLaDA trained with LLaDA's SFT
objective to answer chains of one-digit additions and subtractions with
worked steps (``"47+3-8=?"`` -> ``"47+3=50. 50-8=42. The answer is 42."``,
26 to 197 tokens); ``tests/fixtures/trained-arith-ar`` is mlx-lm's Llama of
the same shape trained on the same problems with the same steps and
schedule (``benchmarks/train_tiny_llada.py --task arith``). Their held-out
problems (``heldout.jsonl``) were never trained on;
``benchmarks/evaluate_arith.py`` measures both on all of them.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from train_tiny_llada import (  # noqa: E402
    Batches,
    build_tokenizer,
    heldout_problems,
    make_task,
)

DIFFUSION = FIXTURES / "trained-arith"
AUTOREGRESSIVE = FIXTURES / "trained-arith-ar"
N = 6  # held-out problems per mode: a few seconds each


def _heldout():
    lines = (DIFFUSION / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _training():
    return json.loads((DIFFUSION / "training.json").read_text())


def test_the_heldout_set_is_the_training_runs_and_never_trained_on():
    heldout = _heldout()
    args = _training()["args"]
    task = make_task("arith", max_ops=args["max_ops"])
    questions = heldout_problems(task, args["heldout"], args["heldout_seed"])
    assert [h["prompt"] for h in heldout] == questions
    assert all(h["answer"] == task.final(h["prompt"]) for h in heldout)
    # The training stream (the same seed and data as the run) excludes them.
    rng = np.random.default_rng(args["seed"])
    data = Batches(
        build_tokenizer(),
        rng,
        task,
        sorted(args["answer_lengths"]),
        args["batch_size"],
        set(questions),
    )
    seen = set()
    for _ in range(200):
        problems, n = data.next()
        seen.update(problems)
        data.noised(data.make(problems, n)[2], args["eps"])
    assert seen and not seen & set(questions)


def test_the_twins_have_one_shape_and_one_tokenizer():
    d = json.loads((DIFFUSION / "config.json").read_text())
    a = json.loads((AUTOREGRESSIVE / "config.json").read_text())
    assert a["model_type"] == "llama" and d["model_type"] == "llada"
    assert (d["d_model"], d["n_layers"], d["n_heads"], d["mlp_hidden_size"]) == (
        a["hidden_size"],
        a["num_hidden_layers"],
        a["num_attention_heads"],
        a["intermediate_size"],
    )
    assert d["vocab_size"] == a["vocab_size"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (DIFFUSION / name).read_text() == (AUTOREGRESSIVE / name).read_text()
    d_run, a_run = _training(), json.loads(
        (AUTOREGRESSIVE / "training.json").read_text()
    )
    same = ("steps", "batch_size", "lr", "warmup", "seed", "answer_lengths")
    assert [d_run["args"][k] for k in same] == [a_run["args"][k] for k in same]


@pytest.fixture(scope="module")
def models():
    import mlx_lm

    return mlx_lm.load(str(DIFFUSION)), mlx_lm.load(str(AUTOREGRESSIVE))


def _answers(model, tokenizer, problems, **kwargs):
    from mlx_lm import stream_generate

    right, calls = 0, []
    for p in problems:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}], add_generation_prompt=True
        )
        steps = []
        if hasattr(model, "diffusion"):
            kwargs["on_step"] = steps.append
        text = "".join(
            r.text for r in stream_generate(model, tokenizer, prompt, **kwargs)
        )
        right += f"The answer is {p['answer']}." in text
        calls.append(steps[-1].nfe if steps else None)
    return right, calls


def test_mlx_lm_answers_with_both_twins(models):
    (diffusion, tokenizer), (ar, ar_tokenizer) = models
    problems = _heldout()[:N]
    # mlx-lm's defaults: max_tokens 256, greedy; the checkpoint's defaults.
    right, calls = _answers(diffusion, tokenizer, problems, max_tokens=256)
    ar_right, _ = _answers(ar, ar_tokenizer, problems, max_tokens=256)
    assert right >= N - 1, f"diffusion {right}/{N}"
    assert ar_right >= N - 1, f"autoregressive {ar_right}/{N}"
    assert all(c is not None for c in calls)


FAST = {
    "suffix 32": dict(suffix_length=32),
    "tail window": dict(dual_window="tail"),
    "suffix 32 + tail window": dict(suffix_length=32, dual_window="tail"),
}


@pytest.mark.parametrize("settings", FAST.values(), ids=FAST.keys())
def test_fast_modes_keep_the_answers_with_fewer_positions(models, settings):
    (diffusion, tokenizer), _ = models
    problems = _heldout()[:N]
    base, base_calls = _answers(diffusion, tokenizer, problems, max_tokens=256)
    fast, fast_calls = _answers(
        diffusion, tokenizer, problems, max_tokens=256, **settings
    )
    assert fast >= base - 1, f"{settings}: {fast}/{N}, default {base}/{N}"
