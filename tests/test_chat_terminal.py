"""mlx-lm's unchanged ``mlx_lm.chat`` on LLaDA checkpoints, in a real terminal.

Each test drives the command in a pseudo-terminal (pexpect), as a person
would: it types turns, ``r`` to reset, ``q`` to quit, and presses Ctrl-C.
"""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import GOLDEN, golden_cases, load_golden
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache

pexpect = pytest.importorskip("pexpect")

CHAT = golden_cases("chat")[0]
SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
INPUT_PROMPT = "›"  # mlx_lm.chat's input line
END_OF_TURN = r"\d+ tokens · "  # the statistics line after each answer


def chat_command():
    script = Path(sys.executable).parent / "mlx_lm.chat"
    if script.exists():
        return str(script), []
    return sys.executable, ["-m", "mlx_lm", "chat"]


def spawn(model, *args, settings=None):
    """``mlx_lm.chat --model MODEL ARGS`` in a terminal, at its first prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_LM_LLADA_")}
    env.update(HF_HUB_OFFLINE="1", TERM="xterm", COLUMNS="100", LINES="40")
    env.update(
        {f"MLX_LM_LLADA_{k.upper()}": str(v) for k, v in (settings or {}).items()}
    )
    command, prefix = chat_command()
    child = pexpect.spawn(
        command,
        prefix + ["--model", str(model), *args],
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=90,
        dimensions=(40, 100),
        # A test run started in the background ignores SIGINT, and a child
        # would inherit that: Ctrl-C must reach the chat as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect(INPUT_PROMPT)
    return child


def say(child, text):
    """Type one turn; return what the terminal showed until the next prompt."""
    child.sendline(text)
    child.expect(END_OF_TURN)
    shown = child.before
    child.expect(INPUT_PROMPT)
    return shown


def quit_chat(child):
    child.sendline("q")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def expected_answer(name, question, max_tokens, **settings):
    """The answer of a fresh conversation, in this process."""
    model, tokenizer = load_golden(name)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    responses = list(
        stream_generate(
            model,
            tokenizer,
            ids,
            max_tokens=max_tokens,
            prompt_cache=make_prompt_cache(model),
            **settings,
        )
    )
    return "".join(r.text for r in responses), [r.token for r in responses]


def assert_no_special_text(transcript):
    shown = [t for t in SPECIAL_TOKENS if t in transcript]
    assert not shown, f"special tokens printed: {shown}\n{transcript}"


def test_two_turns_reset_and_quit():
    # The golden chat case (LLaDA's chat.py rules, the reference schedule),
    # typed into the terminal.
    params = CHAT["params"]
    settings = dict(
        steps=params["steps"], block_length=params["block_length"], reference=True
    )
    max_tokens = str(params["gen_length"])
    child = spawn(GOLDEN / CHAT["model"], "--max-tokens", max_tokens, settings=settings)
    transcript = child.before
    first, second = CHAT["turns"][:2]
    transcript += say(child, first["user"])
    assert first["answer_text"] in transcript
    shown = say(child, second["user"])  # answered in the first turn's context
    assert second["answer_text"] in shown
    transcript += shown

    child.sendline("r")
    child.expect("context cleared")
    child.expect(INPUT_PROMPT)
    alone, _ = expected_answer(
        CHAT["model"], second["user"], params["gen_length"], **settings
    )
    assert alone != second["answer_text"]
    shown = say(child, second["user"])  # now without the first turn
    assert alone in shown
    transcript += shown
    quit_chat(child)
    assert_no_special_text(transcript + child.before)


@pytest.mark.parametrize(
    "name, question, settings, special",
    [
        # A confident model that puts <|end_header_id|> inside its answer.
        ("tiny-sharp", "What is the capital of France?", {}, "<|end_header_id|>"),
        # Answers that end at once: with <|endoftext|>, and without it.
        ("tiny-eos", "hello", {}, "<|endoftext|>"),
        ("tiny-eos", "hello", {"logits_eos_inf": True}, "<|eot_id|>"),
    ],
    ids=["inside-answer", "eos", "eot"],
)
def test_special_tokens_are_never_printed(name, question, settings, special):
    settings = {"block_length": 8, **settings}
    text, tokens = expected_answer(name, question, 16, **settings)
    _, tokenizer = load_golden(name)
    assert tokenizer.convert_tokens_to_ids(special) in tokens  # the case holds
    child = spawn(GOLDEN / name, "--max-tokens", "16", settings=settings)
    transcript = child.before + say(child, question)
    assert text in transcript
    transcript += say(child, question)  # a second turn, in the first's context
    quit_chat(child)
    assert_no_special_text(transcript + child.before)


def make_autoregressive_model(path: Path):
    """A tiny random Llama with the golden tokenizer: mlx-lm's own path."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(GOLDEN / "tiny-mha" / f, path / f)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "vocab_size": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)  # weights that generate on and on (no EOS)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def interrupt_generation(model, *args, settings=None):
    """Ctrl-C while an answer is being generated: what happens after it."""
    child = spawn(model, *args, settings=settings)
    child.sendline("hello")
    child.expect("hello")
    # The line editor gives the terminal back (echo on, ^C a signal again)
    # once it has read the line: wait for that on a loaded machine.
    deadline = time.monotonic() + 60
    while not child.getecho() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # well into the answer: it takes far longer than this
    child.sendintr()
    child.expect(pexpect.EOF, timeout=30)  # both commands end
    before, _, after = child.before.partition("^C")
    assert "tokens · " not in before  # the answer was still being generated
    child.close()
    return after, child.exitstatus, child.signalstatus


def test_ctrl_c_during_generation_ends_the_chat_as_for_a_causal_model(tmp_path):
    llama = make_autoregressive_model(tmp_path / "tiny-llama")
    causal = interrupt_generation(llama, "--max-tokens", "1000000")
    # 2048 tokens, one step each: minutes of denoising on this machine.
    diffusion = interrupt_generation(
        GOLDEN / "tiny-mha", "--max-tokens", "2048", settings={"block_length": 32}
    )
    # mlx_lm.chat has no Ctrl-C handler: Python reports the KeyboardInterrupt
    # and the process ends by SIGINT. A LLaDA model ends it the same way, with
    # that one report and nothing else (no second error, no special tokens).
    for after, _, _ in (causal, diffusion):
        # Unindented lines: the report's first and last (frames are indented).
        lines = [line.rstrip() for line in after.splitlines() if line.strip()]
        outer = [line for line in lines if not line.startswith(" ")]
        assert outer == ["Traceback (most recent call last):", "KeyboardInterrupt"]
    assert diffusion[1:] == causal[1:]
    assert_no_special_text(diffusion[0])
