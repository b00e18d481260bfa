"""LLaDA 2.x and LLaDA-MoE through mlx-lm's unchanged commands, as
subprocesses: ``mlx_lm.generate``, ``mlx_lm.chat`` (two turns on one prompt
cache), ``mlx_lm.server`` with the ``openai`` client and ``mlx_lm.convert
-q``, on the tiny golden checkpoints. Each answer is checked against the same
generation in this process, and LLaDA 2's against its reference call.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
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

from mlx_lm_llada import diffusion_generate

LLADA2 = ("llada2", "llada2-tiny")
LLADAMOE = ("lladamoe", "lladamoe-tiny")
MAX_TOKENS = 16


def path(model):
    return golden_dir(model[0]) / model[1]


def special(model):
    return json.loads((golden_dir(model[0]) / "cases.json").read_text())[
        "special_token_ids"
    ]


def user(text):
    return [{"role": "user", "content": text}]


def chat_ids(model, messages):
    _, tokenizer = load_golden(model[1], model[0])
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def in_process(model, prompt, max_tokens=MAX_TOKENS, **kwargs):
    loaded, tokenizer = load_golden(model[1], model[0])
    return list(
        stream_generate(loaded, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    )


def answer(responses):
    if responses[-1].finish_reason == "stop":
        responses = responses[:-1]
    return "".join(r.text for r in responses)


# 1. mlx_lm.generate -------------------------------------------------------------

GENERATE = {
    # LLaDA 2's defaults: its generate() with the exact block cache.
    "llada2-defaults": (LLADA2, {}, dict(block_length=32, steps=32, threshold=0.95)),
    # LLaDA 2.1's token editing, asked for through the environment.
    "llada21-editing": (
        LLADA2,
        {"editing_threshold": 0.5, "num_to_transfer": 2, "threshold": 0.8},
        dict(block_length=32, threshold=0.8, editing_threshold=0.5, num_to_transfer=2),
    ),
    "lladamoe-defaults": (LLADAMOE, {}, None),
}


@pytest.mark.parametrize("model, settings, reference", GENERATE.values(), ids=GENERATE)
def test_mlx_lm_generate(model, settings, reference):
    args = ["--model", path(model), "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args, settings=settings)
    assert out.returncode == 0, out.stderr
    prompt = chat_ids(model, user("hello"))
    responses = in_process(model, prompt, **settings)
    assert answer(responses).strip()
    assert generated_text(out.stdout) == answer(responses)
    assert f"Generation: {len(responses)} tokens" in out.stdout
    if reference is None:
        return
    # The tokens are the reference generate()'s, up to an end of turn.
    loaded, _ = load_golden(model[1], model[0])
    tokens, _ = diffusion_generate(
        loaded, mx.array([prompt]), gen_length=MAX_TOKENS, **reference
    )
    expected = np.array(tokens)[0, len(prompt) :].tolist()
    ends = [i for i, t in enumerate(expected) if t in special(model).values()]
    expected = expected[: ends[0] + 1] if ends else expected
    assert [r.token for r in responses] == expected[: len(responses)]
    assert len(responses) == len(expected)


# 2. mlx_lm.chat, two turns on one cache ------------------------------------------


@pytest.mark.parametrize("model", [LLADA2, LLADAMOE], ids=lambda m: m[1])
def test_mlx_lm_chat_two_turns(model):
    pytest.importorskip("pexpect")
    loaded, _ = load_golden(model[1], model[0])
    questions = ["What is 2 + 2?", "And 3 + 3?"]
    conversation = make_prompt_cache(loaded)
    calls = []
    expected = [
        in_process(
            model,
            chat_ids(model, user(q)),
            prompt_cache=conversation,
            on_step=lambda s: calls.append((s.nfe, s.tokens_in)),
        )
        for q in questions
    ]
    alone = in_process(
        model,
        chat_ids(model, user(questions[1])),
        prompt_cache=make_prompt_cache(loaded),
    )
    # The first turn matters (these random checkpoints may repeat a token, but
    # not its probabilities).
    assert [r.token for r in alone] != [r.token for r in expected[1]] or not all(
        np.allclose(a.logprobs, b.logprobs) for a, b in zip(alone, expected[1])
    )
    if model is LLADA2:
        # The second turn's first call starts after the first turn's stored
        # blocks: the cache holds mlx-lm KV caches, reused across turns.
        second = [t for n, t in calls if n == 1][1]
        context = len(conversation[0].tokens) - len(expected[1])
        window = context - context % 32 + 32  # what a call without it runs
        assert conversation[0].keys.offset > 0
        assert second < window

    chat = ChatTerminal("mlx_lm.chat", "--model", path(model), "--max-tokens", 16)
    for question, responses in zip(questions, expected):
        shown, count = chat.say(question)
        assert answer(responses) in shown
        assert count == len(responses)
        assert "<|" not in shown and "<role>" not in shown
    assert chat.quit() == 0


# 3. mlx_lm.server, with the openai client ---------------------------------------


@pytest.fixture(scope="module", params=[LLADA2, LLADAMOE], ids=lambda m: m[1])
def served(request, tmp_path_factory):
    openai = pytest.importorskip("openai")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(path(request.param), log) as server:
        client = openai.OpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60
        )
        yield request.param, client
        assert server.proc.poll() is None  # alive after every request


def test_server_chat(served):
    model, client = served
    question = "Why is the sky blue?"
    expected = in_process(model, chat_ids(model, user(question)))
    kwargs = dict(
        model="default_model",
        messages=user(question),
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    first = client.chat.completions.create(logprobs=True, **kwargs)
    again = client.chat.completions.create(logprobs=True, **kwargs)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    for r in (first, again):
        assert r.choices[0].message.content == answer(expected)
        ids = [e.id for e in r.choices[0].logprobs.content]
        assert ids == [x.token for x in expected][: len(ids)]
    stream = client.chat.completions.create(stream=True, **kwargs)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == answer(expected)


# 4. mlx_lm.convert -q, then generate ---------------------------------------------


def test_llada2_convert_4bit_then_generate(tmp_path):
    converted = tmp_path / "llada2-tiny-4bit"
    out = run_command(
        "mlx_lm.convert", "--hf-path", path(LLADA2), "--mlx-path", converted, "-q"
    )
    assert out.returncode == 0, out.stderr
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llada2_moe"
    assert config["mask_token_id"] == special(LLADA2)["<|mask|>"]
    quantization = config["quantization"]
    assert quantization["bits"] == 4
    # The router stays at 8 bits and its expert bias in float32.
    gate = "model.layers.1.mlp.gate.gate_proj"
    assert quantization[gate] == {"group_size": 64, "bits": 8}

    quantized, tokenizer = mlx_lm.load(str(converted))
    mlp = quantized.layers[1].mlp
    assert isinstance(mlp.gate.gate_proj, nn.QuantizedLinear)
    assert mlp.gate.gate_proj.bits == 8 and mlp.switch_mlp.gate_proj.bits == 4
    assert mlp.gate.expert_bias.dtype == mx.float32

    args = ["--model", converted, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args)
    assert out.returncode == 0, out.stderr
    prompt = tokenizer.apply_chat_template(user("hello"), add_generation_prompt=True)
    responses = list(
        stream_generate(quantized, tokenizer, prompt, max_tokens=MAX_TOKENS)
    )
    assert generated_text(out.stdout) == answer(responses)

    # The 4-bit logits follow the float ones.
    model, _ = load_golden(LLADA2[1], LLADA2[0])
    x = mx.random.randint(0, 480, (2, 24), key=mx.random.key(0))
    ref, logits = model(x, block_length=8), quantized(x, block_length=8)
    assert mx.all(mx.isfinite(logits)).item()
    cos = (mx.sum(logits * ref) / mx.sqrt(mx.sum(logits**2) * mx.sum(ref**2))).item()
    assert cos > 0.9, cos


# 5. Our generate command's trace, with LLaDA 2.1's editing ------------------------


def test_llada2_trace_with_editing(tmp_path):
    """Each record names the positions a step wrote (commits and edits):
    replaying them gives the streamed tokens, though edits rewrite some."""
    from mlx_lm_llada.visualize import read_trace, replay

    trace = tmp_path / "trace.jsonl"
    settings = ["--editing-threshold", "0.0", "--num-to-transfer", "4"]
    settings += ["--max-post-steps", "1"]
    args = ["--model", path(LLADA2), "--prompt", "hello", "--max-tokens", 40]
    out = run_command("mlx_lm_llada.generate", *args, *settings, "--trace", trace)
    assert out.returncode == 0, out.stderr
    (records,) = read_trace(trace)
    start, steps, end = records[0], records[1:-1], records[-1]
    prompt = chat_ids(LLADA2, user("hello"))
    assert start["prompt_length"] == len(prompt) and start["gen_length"] == 40
    # The first block begins in the prompt (blocks are aligned to 0).
    assert steps[0]["block_start"] == len(prompt) // 32 * 32
    written = [p for s in steps for p in s["positions"]]
    assert len(written) > len(set(written))  # some positions were edited
    assert max(written) < len(prompt) + 40  # nothing past the canvas
    assert replay(records) == end["tokens"]
    responses = in_process(
        LLADA2,
        prompt,
        max_tokens=40,
        editing_threshold=0.0,
        num_to_transfer=4,
        max_post_steps=1,
    )
    assert end["tokens"][len(prompt) :][: len(responses)] == [
        r.token for r in responses
    ]
