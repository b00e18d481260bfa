"""The arithmetic twins: ``tests/fixtures/trained-arith``, a LLaDA, and
``tests/fixtures/trained-arith-ar``, mlx-lm's Llama of the same shape, both
trained by ``benchmarks/train_tiny_llada.py --task arith`` on the same
problems with the same budget, so that diffusion and autoregression compare
side by side (``benchmarks/evaluate_arith.py``)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from train_tiny_llada import heldout_problems, make_task  # noqa: E402

DIFFUSION = FIXTURES / "trained-arith"
AUTOREGRESSIVE = FIXTURES / "trained-arith-ar"


def _training(path):
    return json.loads((path / "training.json").read_text())


def _budget(command):
    """A stage's command less what may differ between the twins."""
    words = shlex.split(command)
    drop = {"--objective", "--out", "--init"}
    kept, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in drop:
            skip = True
        else:
            kept.append(w)
    return kept


def test_the_twins_were_trained_alike():
    diffusion, autoregressive = _training(DIFFUSION), _training(AUTOREGRESSIVE)
    assert diffusion["args"]["objective"] == "diffusion"
    assert autoregressive["args"]["objective"] == "autoregressive"
    assert len(diffusion["stages"]) == len(autoregressive["stages"]) >= 1
    for d, a in zip(diffusion["stages"], autoregressive["stages"]):
        assert _budget(d["command"]) == _budget(a["command"])
        assert "--task arith" in d["command"]
        for key in ("steps", "steps_done", "mask_unit", "batch_sizes"):
            assert d[key] == a[key], key
    # Each stage ran to its end: nothing is left to resume.
    for path in (DIFFUSION, AUTOREGRESSIVE):
        assert not (path / "resume.json").exists()
        assert not (path / "resume-optimizer.safetensors").exists()
        for stage in _training(path)["stages"]:
            assert stage["steps_done"] == stage["steps"]


def test_heldout_jsonl_is_the_set_training_left_out():
    args = _training(DIFFUSION)["args"]
    task = make_task("arith", max_ops=args["max_ops"])
    expected = heldout_problems(task, args["heldout"], args["heldout_seed"])
    lines = (DIFFUSION / "heldout.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == expected
    assert [r["answer"] for r in rows] == [task.final(q) for q in expected]
    assert all(set(r) == {"prompt", "answer"} for r in rows)


@pytest.mark.parametrize("path", [DIFFUSION, AUTOREGRESSIVE], ids=["llada", "llama"])
def test_mlx_lm_generate_runs_each_twin(path):
    # A held-out problem through the unchanged command, the chat template on.
    problem = json.loads((DIFFUSION / "heldout.jsonl").read_text().splitlines()[0])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(path),
            "--prompt",
            problem["prompt"],
            "--max-tokens",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout.split("==========")[1]
    # Both answer it with the whole worked countdown, as trained.
    assert text.strip() == make_task("arith").answer(problem["prompt"]), text
    assert "Generation:" in out.stdout
