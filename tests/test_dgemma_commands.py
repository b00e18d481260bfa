"""DiffusionGemma through mlx-lm's unchanged commands, as subprocesses:
``mlx_lm.generate``, ``mlx_lm.chat`` (two turns on one encoder cache),
``mlx_lm.server`` with the ``openai`` client, ``mlx_lm.convert -q``, and our
generate's trace, on the tiny golden checkpoints. The noise comes from MLX's
generator, so each command is seeded and checked against the same seeded
generation in this process.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from conftest import (
    ChatTerminal,
    generated_text,
    golden_dir,
    load_golden,
    run_command,
    serving,
)
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

FAMILY = "dgemma"
NAME = "tiny-sharp"  # confident: its canvases stop before 48 steps
PATH = golden_dir(FAMILY) / NAME
MAX_TOKENS = 12  # two canvases of 8


def user(text):
    return [{"role": "user", "content": text}]


def as_command(seed):
    """The model and tokenizer as mlx_lm.generate and mlx_lm.chat have them:
    seeded, then loaded (loading draws from MLX's generator)."""
    mx.random.seed(seed)
    return mlx_lm.load(str(PATH))


def in_process(prompt, seed, max_tokens=MAX_TOKENS, loaded=None, **kwargs):
    """``stream_generate`` at temperature 0 (the commands' default): the
    proposals are the argmax, the noise MLX's, from ``seed`` (reseeded after
    loading when ``loaded`` is given, as the server does per request)."""
    model, tokenizer = loaded or as_command(seed)
    if loaded is not None:
        mx.random.seed(seed)
    return list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=max_tokens,
            sampler=make_sampler(0.0),
            **kwargs,
        )
    )


def chat_ids(messages):
    _, tokenizer = load_golden(NAME, FAMILY)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def answer(responses):
    if responses[-1].finish_reason == "stop":
        responses = responses[:-1]
    return "".join(r.text for r in responses)


def test_mlx_lm_generate():
    args = ["--model", PATH, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args, "--seed", 2)
    assert out.returncode == 0, out.stderr
    responses = in_process(chat_ids(user("hello")), seed=2)
    assert len(responses) == MAX_TOKENS  # past the first canvas
    assert generated_text(out.stdout) == answer(responses)
    assert f"Generation: {len(responses)} tokens" in out.stdout
    # The noise is the seed's: another seed ends at once (an end token).
    other = in_process(chat_ids(user("hello")), seed=3)
    assert [r.token for r in other] == [1]


def test_mlx_lm_chat_two_turns():
    pytest.importorskip("pexpect")
    questions = ["What is 2 + 2?", "And 3 + 3?"]
    model, tokenizer = as_command(0)  # mlx_lm.chat's default seed
    conversation = make_prompt_cache(model)
    expected = []
    for q in questions:
        ids = chat_ids(user(q))
        expected.append(
            list(
                stream_generate(
                    model,
                    tokenizer,
                    ids,
                    max_tokens=16,
                    prompt_cache=conversation,
                    sampler=make_sampler(0.0),
                )
            )
        )
    # The second turn's prompt was encoded on top of the first turn's cache.
    keys = conversation[0].keys
    assert len(keys.tokens) > len(chat_ids(user(questions[0])))

    chat = ChatTerminal("mlx_lm.chat", "--model", PATH, "--max-tokens", 16)
    for question, responses in zip(questions, expected):
        shown, count = chat.say(question)
        assert answer(responses) in shown
        assert count == len(responses)
    assert chat.quit() == 0


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    openai = pytest.importorskip("openai")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(PATH, log) as served:
        yield openai.OpenAI(
            base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60
        )
        assert served.proc.poll() is None


def test_server_chat(client):
    question = "Why is the sky blue?"
    expected = in_process(
        chat_ids(user(question)), seed=5, loaded=load_golden(NAME, FAMILY)
    )
    kwargs = dict(
        model="default_model",
        messages=user(question),
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        seed=5,
    )
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)  # from the server's cache
    for r in (first, again):
        assert r.choices[0].message.content == answer(expected)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    stream = client.chat.completions.create(stream=True, **kwargs)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == answer(expected)


def test_convert_4bit_then_generate(tmp_path):
    converted = tmp_path / "dgemma-4bit"
    out = run_command(
        "mlx_lm.convert", "--hf-path", PATH, "--mlx-path", converted, "-q"
    )
    assert out.returncode == 0, out.stderr
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma"
    quantization = config["quantization"]
    assert quantization["bits"] == 4
    # The router's projection stays at 8 bits (as gemma4_text's).
    assert quantization["model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}
    quantized, tokenizer = mlx_lm.load(str(converted))
    assert isinstance(quantized.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert quantized.layers[0].router.proj.bits == 8

    args = ["--model", converted, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args, "--seed", 2)
    assert out.returncode == 0, out.stderr
    mx.random.seed(2)
    quantized, tokenizer = mlx_lm.load(str(converted))
    ids = tokenizer.apply_chat_template(user("hello"), add_generation_prompt=True)
    responses = list(
        stream_generate(
            quantized, tokenizer, ids, max_tokens=MAX_TOKENS, sampler=make_sampler(0.0)
        )
    )
    # (The subprocess's output is read as text: a "\r" comes back as "\n".)
    assert generated_text(out.stdout) == answer(responses).replace("\r", "\n")


def test_trace_shows_the_drafts(tmp_path):
    from mlx_lm_llada.visualize import read_trace, replay

    trace = tmp_path / "trace.jsonl"
    args = ["--model", PATH, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    html = tmp_path / "trace.html"
    watch = ["--trace", trace, "--trace-html", html, "--visualize"]
    out = run_command("mlx_lm_llada.generate", *args, "--seed", 2, *watch)
    assert out.returncode == 0, out.stderr
    # Without a terminal the view prints one line: the canvases' tokens.
    assert "canvas: 16/16 tokens · 2/2 blocks of 8" in out.stdout
    assert '"event": "step"' in html.read_text()
    (records,) = read_trace(trace)
    steps = records[1:-1]
    assert {s["block_start"] for s in steps} == {
        records[0]["prompt_length"],
        records[0]["prompt_length"] + 8,
    }
    assert len(steps) > 2  # several drafts a canvas
    responses = in_process(chat_ids(user("hello")), seed=2)
    P = records[0]["prompt_length"]
    assert replay(records)[P : P + MAX_TOKENS] == [r.token for r in responses]


def test_first_token_comes_after_the_first_canvas():
    """A canvas's tokens are yielded as soon as it is committed: the first
    token arrives after the first canvas's decoder calls, not after the
    request's (here two canvases)."""
    model, tokenizer = load_golden(NAME, FAMILY)
    calls = []
    mx.random.seed(2)
    first = None
    responses = []
    for r in stream_generate(
        model,
        tokenizer,
        chat_ids(user("hello")),
        max_tokens=MAX_TOKENS,
        sampler=make_sampler(0.0),
        on_step=lambda s: calls.append(s.block),
    ):
        if first is None:
            first = list(calls)
        responses.append(r)
    assert len(responses) == MAX_TOKENS
    assert set(first) == {0}  # only the first canvas's calls
    assert len(first) == calls.count(0) < len(calls)
