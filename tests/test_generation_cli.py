"""mlx-lm's own commands (and ours) on a LLaDA checkpoint, as subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from conftest import GOLDEN, golden_cases, load_golden

MODEL = str(GOLDEN / "tiny-mha")
CHAT = golden_cases("chat")[0]


def command(name):
    """The console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    package, _, sub = name.partition(".")
    if package == "mlx_lm":
        return [sys.executable, "-m", "mlx_lm", sub]
    return [sys.executable, "-m", name]


def run(name, *args, stdin=None, env=None, timeout=120):
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLX_LM_LLADA_") or k == "MLX_LM_LLADA_DISABLE"
    }
    environ.update(HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", COLUMNS="80")
    environ.update(env or {})
    return subprocess.run(
        command(name) + list(args),
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=environ,
        timeout=timeout,
    )


def printed_text(stdout):
    """The generated text that mlx_lm.generate prints between its rules."""
    parts = stdout.split("==========\n")
    assert len(parts) >= 3, stdout
    assert parts[1].endswith("\n")
    return parts[1][:-1]


def expected_text(prompt, chat_template=True, seed=None, **kwargs):
    if seed is not None:
        # The command seeds before loading: model construction draws numbers.
        mx.random.seed(seed)
        model, tokenizer = mlx_lm.load(MODEL)
    else:
        model, tokenizer = load_golden("tiny-mha")
    if chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    else:
        ids = tokenizer.encode(prompt)
    return mlx_lm.generate(model, tokenizer, ids, **kwargs)


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat", "raw"])
def test_mlx_lm_generate(chat_template):
    args = ["--model", MODEL, "--prompt", "hello", "--max-tokens", "12"]
    if not chat_template:
        args.append("--ignore-chat-template")
    out = run("mlx_lm.generate", *args)
    assert out.returncode == 0, out.stderr
    text = printed_text(out.stdout)
    assert text
    assert text == expected_text("hello", chat_template, max_tokens=12)
    assert "Generation: 12 tokens" in out.stdout


def test_our_generate_with_diffusion_flags():
    flags = ["--block-length", "8", "--steps", "16", "--threshold", "0.9"]
    flags += ["--cache", "dual", "--remasking", "random", "--seed", "7"]
    out = run(
        "mlx_lm_llada.generate",
        "--model",
        MODEL,
        "--prompt",
        "hello",
        "--max-tokens",
        "16",
        *flags,
    )
    assert out.returncode == 0, out.stderr
    text = printed_text(out.stdout)
    assert text == expected_text(
        "hello",
        seed=7,
        max_tokens=16,
        block_length=8,
        steps=16,
        threshold=0.9,
        cache="dual",
        remasking="random",
    )
    assert "Generation: 16 tokens" in out.stdout


def test_our_generate_with_the_reference_flag():
    args = ["--model", MODEL, "--prompt", "hello", "--max-tokens", "16"]
    out = run("mlx_lm_llada.generate", *args, "--reference")
    assert out.returncode == 0, out.stderr
    text = printed_text(out.stdout)
    assert text
    assert text == expected_text("hello", max_tokens=16, reference=True)
    assert "Generation: 16 tokens" in out.stdout


def test_our_generate_refuses_reference_with_a_cache():
    # The exact schedule with a cache is a contradiction, named.
    args = ["--model", MODEL, "--prompt", "hi", "--reference", "--cache", "dual"]
    out = run("mlx_lm_llada.generate", *args)
    assert out.returncode != 0
    assert "reference=True" in out.stderr
    assert "cannot be combined with cache" in out.stderr


def test_our_generate_refuses_reference_with_a_cache_before_generating():
    # As for any other bad flag (test_our_generate_refuses_a_bad_flag).
    args = ["--model", MODEL, "--prompt", "hi", "--reference", "--cache", "dual"]
    out = run("mlx_lm_llada.generate", *args)
    assert out.returncode != 0
    assert "cannot be combined with cache" in out.stderr
    assert "==========" not in out.stdout  # refused before generating
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--block-length", "0", "block_length must be positive, got 0"),
        ("--cache", "bogus", "cache must be one of"),
        ("--remasking", "bogus", "remasking must be one of"),
    ],
)
def test_our_generate_refuses_a_bad_flag(flag, value, message):
    out = run("mlx_lm_llada.generate", "--model", MODEL, "--prompt", "hi", flag, value)
    assert out.returncode != 0
    assert message in out.stderr
    assert value in out.stderr
    assert "==========" not in out.stdout  # refused before generating


def answers_in(stdout, answers):
    """Each answer appears, in order."""
    pos = 0
    for answer in answers:
        found = stdout.find(answer, pos)
        assert found >= 0, (answer, stdout[pos:])
        pos = found + len(answer)


@pytest.mark.parametrize("how", ["mlx_lm.chat", "mlx_lm_llada.chat"])
def test_chat_two_turns(how):
    # The golden chat case's first two turns, typed into the command.
    params = CHAT["params"]
    turns = CHAT["turns"][:2]
    args = ["--model", MODEL, "--max-tokens", str(params["gen_length"])]
    env = {}
    if how == "mlx_lm.chat":
        env = {
            "MLX_LM_LLADA_REFERENCE": "1",
            "MLX_LM_LLADA_STEPS": str(params["steps"]),
            "MLX_LM_LLADA_BLOCK_LENGTH": str(params["block_length"]),
        }
    else:
        args += ["--reference", "--steps", str(params["steps"])]
        args += ["--block-length", str(params["block_length"])]
    stdin = "".join(t["user"] + "\n" for t in turns) + "q\n"
    out = run(how, *args, stdin=stdin, env=env)
    assert out.returncode == 0, out.stderr
    answers_in(out.stdout, [t["answer_text"] for t in turns] + ["bye"])
    assert out.stdout.count(f"{params['gen_length']} tokens") == 2


# mlx_lm.lora trains diffusion models (tests/test_lora.py).
@pytest.mark.parametrize(
    "name, args",
    [("mlx_lm.perplexity", ["--data-path", "/nonexistent/data"])],
)
def test_causal_only_commands_refuse(name, args):
    # The data does not exist: the refusal must come first, right after load.
    out = run(name, "--model", MODEL, *args)
    assert out.returncode != 0
    assert f"{name} assumes a causal (autoregressive) language model" in out.stderr
    assert "masked-diffusion model" in out.stderr
    assert "Traceback" not in out.stderr
