"""Dream through mlx-lm's unchanged commands (and ours), as subprocesses.

``mlx_lm.generate``, ``mlx_lm.chat`` in a terminal, ``mlx_lm.server`` with the
``openai`` client, ``mlx_lm.convert -q``, ``mlx_lm_llada.generate``'s trace
and live view, and what ``mlx_lm.load`` refuses, on the tiny Dream
checkpoints (tests/fixtures/golden/dream). Each command's answer is checked
against the same generation in this process.
"""

import json
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from conftest import (
    ChatTerminal,
    command_env,
    generated_text,
    golden_dir,
    load_golden,
    run_command,
    serving,
)
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache

from mlx_lm_llada import diffusion_generate
from mlx_lm_llada.visualize import read_trace, replay

FAMILY = "dream"
DREAM = golden_dir(FAMILY)
SPECIAL = json.loads((DREAM / "cases.json").read_text())["special_token_ids"]
MASK = SPECIAL["<|mask|>"]
END_TOKENS = [SPECIAL["<|endoftext|>"], SPECIAL["<|im_end|>"]]  # EOS, then EoT
MAX_TOKENS = 16


def load(name):
    return load_golden(name, FAMILY)


def user(text):
    return [{"role": "user", "content": text}]


def chat_ids(name, messages):
    _, tokenizer = load(name)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def in_process(name, prompt, max_tokens=MAX_TOKENS, model=None, **kwargs):
    """``stream_generate`` in this process: the responses."""
    loaded, tokenizer = load(name)
    model = loaded if model is None else model
    return list(
        stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    )


def answer(responses):
    """The answer's text, less that of an end token that stops it (as the
    server sends it)."""
    if responses[-1].finish_reason == "stop":
        responses = responses[:-1]
    return "".join(r.text for r in responses)


def tiny_copy(tmp_path, edit=None):
    """A copy of tiny-mha and its config, which ``edit`` changes (on disk)."""
    path = tmp_path / "tiny-mha"
    shutil.copytree(DREAM / "tiny-mha", path)
    config = json.loads((path / "config.json").read_text())
    if edit is not None:
        edit(config)
        (path / "config.json").write_text(json.dumps(config))
    return path, config


# 1. mlx_lm.generate ---------------------------------------------------------

GENERATE = {
    # The model's defaults: Fast-dLLM's Dream loop (blocks of 32, dual cache,
    # threshold 0.9), and the same through Dream's reference call.
    "defaults": (
        {},
        dict(
            max_new_tokens=32,
            block_length=32,
            dual_cache=True,
            alg="confidence_threshold",
            threshold=0.9,
        ),
    ),
    # Dream's own diffusion_generate (its timestep schedule over the whole
    # canvas), asked for through the environment.
    "reference": (
        {"reference": True, "steps": 8},
        dict(max_new_tokens=MAX_TOKENS, steps=8, alg="maskgit_plus"),
    ),
}


@pytest.mark.parametrize("settings, reference_call", GENERATE.values(), ids=GENERATE)
def test_mlx_lm_generate(settings, reference_call):
    name = "tiny-mha"
    model_path = DREAM / name
    args = ["--model", model_path, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args, settings=settings)
    assert out.returncode == 0, out.stderr

    prompt = chat_ids(name, user("hello"))  # the command applies the template
    responses = in_process(name, prompt, **settings)
    assert generated_text(out.stdout) == answer(responses)
    assert answer(responses).strip()
    assert f"Generation: {len(responses)} tokens" in out.stdout
    assert f"Prompt: {len(prompt)} tokens" in out.stdout

    # The tokens are those of Dream's reference call, up to an end token.
    model, _ = load(name)
    tokens, _ = diffusion_generate(model, mx.array([prompt]), **reference_call)
    reference = np.array(tokens)[0, len(prompt) :].tolist()
    ends = [i for i, t in enumerate(reference) if t in END_TOKENS]
    reference = reference[: ends[0] + 1 if ends else MAX_TOKENS][:MAX_TOKENS]
    assert [r.token for r in responses] == reference


# 2. mlx_lm.chat, in a terminal ----------------------------------------------


def test_mlx_lm_chat_two_turns():
    pytest.importorskip("pexpect")
    name = "tiny-mha"
    questions = ["What is 2 + 2?", "And 3 + 3?"]
    model, _ = load(name)
    conversation = make_prompt_cache(model)  # one cache for both turns, as chat
    expected = [
        in_process(name, chat_ids(name, user(q)), prompt_cache=conversation)
        for q in questions
    ]
    alone = in_process(
        name, chat_ids(name, user(questions[1])), prompt_cache=make_prompt_cache(model)
    )
    # The case holds: the second answer depends on the first turn, and it ends
    # with Dream's <|im_end|> before max_tokens.
    assert answer(alone) != answer(expected[1])
    assert expected[1][-1].token == SPECIAL["<|im_end|>"]
    assert len(expected[1]) < MAX_TOKENS

    chat = ChatTerminal("mlx_lm.chat", "--model", DREAM / name, "--max-tokens", 16)
    chat.say(questions[0])
    chat.reset()  # then the two turns of one conversation, as in this process
    for question, responses in zip(questions, expected):
        shown, count = chat.say(question)
        assert answer(responses) in shown
        assert count == len(responses)
        assert "<|" not in shown  # special tokens are not text
    assert chat.quit() == 0


# 3. mlx_lm.server, with the openai client -----------------------------------

SERVED = "tiny-sharp"  # confident and printable


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    openai = pytest.importorskip("openai")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(DREAM / SERVED, log) as served:
        yield openai.OpenAI(
            base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60
        )
        assert served.proc.poll() is None  # alive after every request


def ask_chat(client, question, **kwargs):
    return client.chat.completions.create(
        model="default_model",
        messages=user(question),
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        **kwargs,
    )


def test_server_chat_completions(client):
    question = "Why is the sky blue?"
    expected = in_process(SERVED, chat_ids(SERVED, user(question)))
    first = ask_chat(client, question, logprobs=True)
    again = ask_chat(client, question, logprobs=True)  # from the server's cache
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    for r in (first, again):
        choice = r.choices[0]
        assert [e.id for e in choice.logprobs.content] == [x.token for x in expected]
        assert choice.message.content == answer(expected)
        assert choice.finish_reason == expected[-1].finish_reason
        assert r.usage.completion_tokens == len(expected)

    chunks = list(ask_chat(client, question, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer(expected)
    assert chunks[-1].choices[0].finish_reason == expected[-1].finish_reason


def test_server_text_completions(client):
    _, tokenizer = load(SERVED)
    prompt = "Once upon a time"
    expected = in_process(SERVED, tokenizer.encode(prompt), max_tokens=12)
    request = dict(model="default_model", prompt=prompt, max_tokens=12)
    whole = client.completions.create(temperature=0.0, **request)
    assert whole.choices[0].text == answer(expected)
    assert whole.usage.completion_tokens == len(expected)
    chunks = client.completions.create(temperature=0.0, stream=True, **request)
    assert "".join(c.choices[0].text for c in chunks) == answer(expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"block_length": 0}, "block_length must be positive, got 0"),
        ({"cache": "bogus"}, "cache must be one of"),
        ({"stepz": 4}, "Unknown diffusion setting(s) stepz"),
    ],
    ids=["value", "choice", "name"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_server_refuses_a_bad_diffusion_setting(client, settings, message, stream):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.APIStatusError) as err:
        ask_chat(client, "hello", stream=stream, extra_body={"diffusion": settings})
    assert err.value.status_code == 400
    assert message in str(err.value.body)
    assert "Traceback" not in str(err.value.body)


# 4. mlx_lm.convert -q, then mlx_lm.generate from the 4-bit copy -------------


def test_convert_4bit_then_generate(tmp_path):
    name = "tiny-mha"
    source, _ = tiny_copy(tmp_path)
    converted = tmp_path / f"{name}-4bit"
    args = ["--hf-path", source, "--mlx-path", converted, "-q"]
    out = run_command("mlx_lm.convert", *args)
    assert out.returncode == 0, out.stderr

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "Dream"
    assert config["mask_token_id"] == MASK
    assert config["quantization"]["bits"] == 4

    args = ["--model", converted, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args)
    assert out.returncode == 0, out.stderr
    quantized, _ = mlx_lm.load(str(converted))
    expected = in_process(name, chat_ids(name, user("hello")), model=quantized)
    assert generated_text(out.stdout) == answer(expected)
    assert f"Generation: {len(expected)} tokens" in out.stdout

    attention = quantized.model.layers[0].self_attn
    assert isinstance(attention.q_proj, nn.QuantizedLinear)
    assert attention.q_proj.bits == 4
    assert isinstance(quantized.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(quantized.lm_head, nn.QuantizedLinear)
    # The 4-bit logits follow the float ones (as for LLaDA's 4-bit copy).
    model, _ = load(name)
    x = mx.random.randint(0, 486, (2, 24), key=mx.random.key(0))
    ref, logits = model(x), quantized(x)
    assert logits.shape == ref.shape and mx.all(mx.isfinite(logits)).item()
    err = mx.abs(logits - ref).max().item()
    agree = mx.mean(logits.argmax(-1) == ref.argmax(-1)).item()
    cos = (mx.sum(logits * ref) / mx.sqrt(mx.sum(logits**2) * mx.sum(ref**2))).item()
    assert err < 3.0 and agree >= 0.5 and cos > 0.9, (err, agree, cos)


# 5. mlx_lm_llada.generate --visualize --trace --trace-html ------------------


def test_trace_and_plain_view(tmp_path):
    name = "tiny-gqa"  # mostly printable text
    trace, html = tmp_path / "t.jsonl", tmp_path / "t.html"
    args = ["--model", DREAM / name, "--prompt", "hello", "--max-tokens", 32]
    args += ["--block-length", 16, "--visualize", "--trace", trace]
    out = run_command("mlx_lm_llada.generate", *args, "--trace-html", html)
    assert out.returncode == 0, out.stderr
    prompt = chat_ids(name, user("hello"))
    expected = answer(in_process(name, prompt, max_tokens=32, block_length=16))

    # Not a terminal: one plain line, no escape codes, then mlx-lm's text.
    assert "\x1b" not in out.stdout + out.stderr
    assert "\ncanvas: 32/32 tokens · 2/2 blocks of 16 · " in out.stdout
    assert out.stdout.index("canvas: 32/32") < out.stdout.index(expected)

    (run,) = read_trace(trace)
    start, steps, end = run[0], run[1:-1], run[-1]
    assert start["prompt"] == prompt and start["mask_token_id"] == MASK
    assert start["end_token_ids"] == END_TOKENS
    assert replay(run) == end["tokens"] and end["text"] == expected
    # Dream's shifted logits: with a cache, a block's first call commits its
    # first position alone (predicted from the position before the block).
    for block in (0, 1):
        first = next(s for s in steps if s["block"] == block)
        assert first["positions"] == [len(prompt) + 16 * block]
    # The page carries the same records (and nothing from outside).
    page = html.read_text(encoding="utf-8")
    data = re.search(r'<script id="trace-data" [^>]*>(.*?)</script>', page, re.S)
    assert json.loads(data.group(1))["records"] == run
    assert not re.search(r"https?://|\ssrc=|<link", page)


# 6. What mlx_lm.load refuses, and what it never does ------------------------


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.pop("mask_token_id"), ["missing", "mask_token_id"]),
        (
            lambda c: c.update(use_sliding_window=True, sliding_window=16),
            ["use_sliding_window", "not supported"],
        ),
    ],
    ids=["no-mask-token-id", "sliding-window"],
)
def test_config_refused(tmp_path, edit, words):
    with pytest.raises(ValueError) as err:
        mlx_lm.load(str(tiny_copy(tmp_path, edit)[0]))
    assert all(w in str(err.value) for w in words), str(err.value)


REMOTE_CODE = "open({marker!r}, 'w').write('ran')\n"


def test_load_runs_no_remote_code_and_asks_nothing(tmp_path):
    # Dream's config names its remote code (auto_map); here it is present.
    path, config = tiny_copy(tmp_path)
    markers = []
    for module in [v.split(".")[0] for v in config["auto_map"].values()]:
        markers.append(tmp_path / f"{module}.ran")
        (path / f"{module}.py").write_text(REMOTE_CODE.format(marker=str(markers[-1])))
    code = f"import mlx_lm; mlx_lm.load({str(path)!r}); print('loaded')"
    env = command_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    # stdin closed: a question about remote code would fail, not wait.
    out = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded"
    assert "custom code" not in out.stdout + out.stderr
    assert len(markers) == 2 and not any(m.exists() for m in markers)


def hub_tokenizer_copy(tmp_path):
    """tiny-mha with its tokenizer as the Hub's Dream checkpoints ship it:
    ``vocab.json`` and ``merges.txt`` for a remote ``DreamTokenizer``
    (``auto_map``), no ``tokenizer.json``."""
    path, _ = tiny_copy(tmp_path)
    fast = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").unlink()
    (path / "vocab.json").write_text(json.dumps(fast["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in fast["model"]["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "DreamTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "tokenization_dream.py").write_text(
        REMOTE_CODE.format(marker=str(tmp_path / "tokenizer.ran"))
    )
    return path


def test_hub_tokenizer_layout_loads_as_qwen2(tmp_path):
    path = hub_tokenizer_copy(tmp_path)
    code = (
        "import mlx_lm\n"
        f"_, t = mlx_lm.load({str(path)!r})\n"
        "print(type(t._tokenizer).__name__, t.encode('x 12'), sorted(t.eos_token_ids))"
    )
    env = command_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "tokenizer.ran").exists()
    name, rest = out.stdout.strip().split(" ", 1)
    # DreamTokenizer is Qwen2's: digits are split one by one.
    assert name == "Qwen2Tokenizer"
    _, tokenizer = load("tiny-mha")
    ids = [tokenizer.encode(c)[0] for c in ("x", " ", "1", "2")]
    assert rest == f"{ids[:1] + [ids[1]] + ids[2:]} {sorted(END_TOKENS)}"
    run = run_command(
        "mlx_lm.generate", "--model", path, "--prompt", "hi", "--max-tokens", "8"
    )
    assert run.returncode == 0, run.stderr
    assert "Generation:" in run.stdout
