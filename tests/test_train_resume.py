"""A training run of ``benchmarks/train_tiny_llada.py`` stopped and resumed
ends where the same run uninterrupted ends, bit for bit: long runs go in
stages that a session's end does not cut short."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))

from train_tiny_llada import main  # noqa: E402

TINY = (
    "--task sort --steps 6 --eval-every 2 --eval-problems 2 --heldout 20 "
    "--batch-size 4 --d-model 32 --n-layers 1 --n-heads 2 --mlp-hidden 64 "
    "--log-every 2 --block-length 16"
).split()


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, objective):
    run = TINY + ["--objective", objective]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    main(run + ["--out", str(whole)])
    main(run + ["--out", str(parts), "--stop-at", "2"])
    # The stopped run's record says how far its stage went.
    (stage,) = json.loads((parts / "training.json").read_text())["stages"]
    assert (stage["steps_done"], stage["steps"]) == (2, 6)
    assert json.loads((parts / "resume.json").read_text())["step"] == 2
    main(run + ["--out", str(parts), "--resume"])

    a = mx.load(str(whole / "model.safetensors"))
    b = mx.load(str(parts / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    # Complete: nothing left to resume, and one stage with the run's command.
    assert not (parts / "resume.json").exists()
    assert not (parts / "resume-optimizer.safetensors").exists()
    (stage,) = json.loads((parts / "training.json").read_text())["stages"]
    assert stage["steps_done"] == stage["steps"] == 6
    assert "--resume" not in stage["command"] and "--stop-at" not in stage["command"]
    assert stage["command"].endswith(f"--objective {objective} --out {parts}")


def test_resume_refuses_another_command_or_nothing_to_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="resume.json not found"):
        main(TINY + ["--out", str(out), "--resume"])
    main(TINY + ["--out", str(out), "--stop-at", "4"])
    with pytest.raises(SystemExit, match="started with a different command"):
        main(TINY + ["--out", str(out), "--resume", "--lr", "1e-4"])


def test_stop_at_must_be_an_evaluation_step_before_the_end(tmp_path):
    for at in ("3", "6", "0"):
        with pytest.raises(SystemExit, match="not an evaluation step"):
            main(TINY + ["--out", str(tmp_path), "--stop-at", at])
