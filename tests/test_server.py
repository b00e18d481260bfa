"""mlx-lm's unchanged ``mlx_lm.server`` serving a LLaDA checkpoint.

One server (a subprocess on a free port of 127.0.0.1) serves every test of
this module; the clients are the official ``openai`` package and, for what it
cannot send, plain HTTP. Answers are checked against ``stream_generate`` run
in this process with a fresh prompt cache.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import GOLDEN, load_golden, reserve_port
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_lm_llada.plugin_settings import set_command_settings

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-sharp"  # confident and varied: no EOS, several tokens
BLOCK_LENGTH = 8
SERVER_ENV = {"MLX_LM_LLADA_BLOCK_LENGTH": str(BLOCK_LENGTH)}
MAX_TOKENS = 16
QUESTION = "Why is the sky blue?"
SPECIAL_TEXTS = ("<|", "|>")


def server_command():
    script = Path(sys.executable).parent / "mlx_lm.server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mlx_lm", "server"]


class Server:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log

    def log_tail(self):
        return self.log.read_text(errors="replace")[-4000:]

    def health(self):
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return r.status, json.loads(r.read())

    def post(self, path, body: bytes):
        """Raw POST: (status, parsed JSON body)."""
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reservation = socket.socket()  # held until the server listens
    port = reserve_port(reservation)
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_LM_LLADA_")}
    env.update(HF_HUB_OFFLINE="1", **SERVER_ENV)
    args = ["--model", str(GOLDEN / MODEL_NAME), "--host", "127.0.0.1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command() + args + ["--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        with reservation:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"the server exited:\n{srv.log_tail()}"
                assert time.monotonic() < deadline, f"no answer:\n{srv.log_tail()}"
                try:
                    if srv.health()[0] == 200:
                        break
                except OSError:
                    time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module", autouse=True)
def in_process_defaults():
    # The in-process reference runs with the server's settings, not ours.
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("MLX_LM_LLADA_") and k != "MLX_LM_LLADA_DISABLE":
                mp.delenv(k)
        set_command_settings()
        yield


def fresh(prompt_ids, max_tokens=MAX_TOKENS, sampler=None, **settings):
    """``stream_generate`` in this process, with a fresh prompt cache."""
    model, tokenizer = load_golden(MODEL_NAME)
    return list(
        stream_generate(
            model,
            tokenizer,
            prompt_ids,
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=make_prompt_cache(model),
            block_length=BLOCK_LENGTH,
            **settings,
        )
    )


def chat_ids(messages):
    _, tokenizer = load_golden(MODEL_NAME)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def answer_text(responses):
    # The server drops the text of the end token that stops an answer.
    if responses[-1].finish_reason == "stop":
        responses = responses[:-1]
    return "".join(r.text for r in responses)


def chat(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0.0)
    return client.chat.completions.create(
        model="default_model", messages=messages, **kwargs
    )


def user(text):
    return [{"role": "user", "content": text}]


def test_chat_answer_is_the_in_process_answer(client):
    r = chat(client, user(QUESTION), logprobs=True)
    expected = fresh(chat_ids(user(QUESTION)))
    choice = r.choices[0]
    assert [e.id for e in choice.logprobs.content] == [x.token for x in expected]
    assert choice.message.content == answer_text(expected)
    assert choice.finish_reason == expected[-1].finish_reason == "length"
    assert r.usage.completion_tokens == MAX_TOKENS
    # Special tokens inside an answer are not text (LLaDA's chat.py rule).
    assert not any(s in choice.message.content for s in SPECIAL_TEXTS)


def test_second_turn_with_server_cache_equals_fresh_cache(client):
    first = chat(client, user("What is the capital of France?"))
    messages = user("What is the capital of France?") + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = chat(client, messages, logprobs=True)
    # The server reused the first turn's cache for this prompt ...
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    # ... and answered as with a fresh one.
    expected = fresh(chat_ids(messages))
    assert [e.id for e in second.choices[0].logprobs.content] == [
        x.token for x in expected
    ]
    assert second.choices[0].message.content == answer_text(expected)
    # The same request again (now a cache hit of its own) gives the same.
    again = chat(client, messages)
    assert again.choices[0].message.content == second.choices[0].message.content


def test_stream_joins_to_the_non_streamed_answer(client):
    whole = chat(client, user("Tell me a story."))
    chunks = list(chat(client, user("Tell me a story."), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text_completion(client, stream):
    _, tokenizer = load_golden(MODEL_NAME)
    expected = fresh(tokenizer.encode("Once upon a time"), max_tokens=12)
    r = client.completions.create(
        model="default_model",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0.0,
        stream=stream,
    )
    if stream:
        text = "".join(c.choices[0].text for c in r)
    else:
        text = r.choices[0].text
        assert r.usage.completion_tokens == 12
    assert text == answer_text(expected)


def test_stop_strings(client):
    _, tokenizer = load_golden(MODEL_NAME)
    expected = fresh(chat_ids(user(QUESTION)))
    tokens = [r.token for r in expected]
    # A token that first appears a few tokens in, after some text, and is its
    # own encoding.
    k = next(
        i
        for i in range(2, len(tokens))
        if tokens[i] not in tokens[:i]
        and "".join(x.text for x in expected[:i])
        and tokenizer.encode(expected[i].text, add_special_tokens=False) == [tokens[i]]
    )
    stop = expected[k].text
    for stream in (False, True):
        r = chat(
            client, user(QUESTION), stop=["never in the text", stop], stream=stream
        )
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == "".join(x.text for x in expected[:k])
        assert finish == "stop"


def test_temperature_seed_and_logprobs(client):
    kwargs = dict(temperature=1.0, seed=11, logprobs=True)
    a = chat(client, user(QUESTION), **kwargs)
    b = chat(client, user(QUESTION), **kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    mx.random.seed(11)
    expected = fresh(chat_ids(user(QUESTION)), sampler=make_sampler(1.0))
    assert a.choices[0].message.content == answer_text(expected)
    content = a.choices[0].logprobs.content
    assert [e.id for e in content] == [x.token for x in expected]
    for entry, x in zip(content, expected):
        assert entry.logprob == pytest.approx(x.logprobs[x.token].item(), abs=1e-5)

    # top_logprobs: the most likely tokens at each position (mlx-lm puts the
    # first of them, not the sampled token, in the entry itself).
    top = chat(client, user(QUESTION), top_logprobs=3, **kwargs)
    assert top.choices[0].message.content == a.choices[0].message.content
    for entry, x in zip(top.choices[0].logprobs.content, expected):
        best = np.argsort(-np.array(x.logprobs))[:3]
        assert sorted(t.id for t in entry.top_logprobs) == sorted(best.tolist())
        for t in entry.top_logprobs:
            assert t.logprob == pytest.approx(x.logprobs[t.id].item(), abs=1e-5)


def test_diffusion_settings_in_the_request(client):
    settings = {"threshold": 0.5, "cache": "dual"}
    r = chat(client, user(QUESTION), extra_body={"diffusion": settings})
    expected = fresh(chat_ids(user(QUESTION)), **settings)
    assert r.choices[0].message.content == answer_text(expected)


def test_concurrent_clients_get_their_own_answers(client):
    bad = dict(extra_body={"diffusion": {"stepz": 4}})
    own_schedule = {"steps": 4, "reference": True}  # steps count without threshold
    requests = [
        ("chat", user("hello"), {}),
        ("chat", user("Tell me a story."), {"max_tokens": 8, "stream": True}),
        ("text", "Once upon a time", {"max_tokens": 12}),
        ("chat", user(QUESTION), {"extra_body": {"diffusion": own_schedule}}),
        ("chat", user("What is the capital of France?"), bad),
        ("text", "The sky is", {"stream": True}),
    ]

    def ask(request):
        kind, prompt, kwargs = request
        kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **kwargs}
        try:
            if kind == "chat":
                r = client.chat.completions.create(
                    model="default_model", messages=prompt, **kwargs
                )
                if kwargs.get("stream"):
                    return "".join(c.choices[0].delta.content or "" for c in r)
                return r.choices[0].message.content
            r = client.completions.create(
                model="default_model", prompt=prompt, **kwargs
            )
            if kwargs.get("stream"):
                return "".join(c.choices[0].text for c in r)
            return r.choices[0].text
        except openai.APIStatusError as e:
            return e.status_code

    sequential = [ask(r) for r in requests]
    assert sequential[4] == 400 and all(isinstance(a, str) for a in sequential[:4])
    with ThreadPoolExecutor(len(requests) * 2) as pool:
        concurrent = list(pool.map(ask, requests * 2))
    assert concurrent == sequential * 2


def test_a_client_that_hangs_up_breaks_nothing(client, server):
    stream = client.completions.create(
        model="default_model", prompt="The sky is", max_tokens=128, stream=True
    )
    next(iter(stream))
    stream.close()  # the server stops this answer at its next write
    r = chat(client, user(QUESTION))
    assert r.choices[0].message.content == answer_text(fresh(chat_ids(user(QUESTION))))
    assert server.health() == (200, {"status": "ok"})


LONG_PROMPT = "hello " * 5000  # more tokens than max_sequence_length (4096)


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        # mlx-lm's own answer, for any model: 404.
        (dict(messages=[]), 404, "empty conversation"),
        (dict(max_tokens=0), 400, "max_tokens must be at least 1"),
        (dict(max_tokens=-5), 400, "max_tokens must be at least 1"),
        (dict(messages=user(LONG_PROMPT)), 400, "longer than the model's context"),
        (dict(max_tokens=5000), 400, "longer than the model's context"),
        (dict(extra_body={"diffusion": {"stepz": 8}}), 400, "Unknown diffusion"),
        (dict(extra_body={"diffusion": {"steps": "8"}}), 400, "steps must be"),
        (dict(extra_body={"diffusion": [8]}), 400, "must be an object of settings"),
        # Checked by the sampler itself, once the canvas is known.
        # (With a threshold, the model's default, steps are unused.)
        (
            dict(extra_body={"diffusion": {"steps": 3, "reference": True}}),
            400,
            "multiple of",
        ),
        (
            dict(extra_body={"diffusion": {"steps": 3, "threshold": None}}),
            400,
            "multiple of",
        ),
        (
            dict(extra_body={"diffusion": {"reference": True, "cache": "dual"}}),
            400,
            "cannot be combined with cache",
        ),
        (dict(frequency_penalty=0.5), 400, "not supported by the diffusion"),
    ],
    ids=[
        "no-messages",
        "max-tokens-0",
        "max-tokens-negative",
        "prompt-too-long",
        "canvas-too-long",
        "unknown-setting",
        "setting-type",
        "settings-not-object",
        "steps-not-multiple",
        "steps-not-multiple-no-threshold",
        "reference-with-cache",
        "penalty",
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_request_gets_a_clear_error(
    client, server, kwargs, status, message, stream
):
    kwargs = {"messages": user(QUESTION), **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, stream=stream, **kwargs)
    assert err.value.status_code == status
    assert message in str(err.value.body)  # the server's {"error": ...}
    assert "Traceback" not in str(err.value.body)
    assert server.proc.poll() is None


def test_malformed_bodies_get_a_clear_error(server):
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, body = server.post(path, b'{"messages": [{"role": "user"')
        assert status == 400 and "Invalid JSON" in body["error"]
        status, body = server.post(path, b"[1, 2]")
        assert status == 400 and "JSON dictionary" in body["error"]
    status, body = server.post("/v1/completions", json.dumps({}).encode())
    assert status == 400 and "prompt" in body["error"]
    status, body = server.post(
        "/v1/completions",
        json.dumps({"prompt": "hi", "max_tokens": 4, "diffusion": {"x": 1}}).encode(),
    )
    assert status == 400 and "Unknown diffusion setting(s) x" in body["error"]


def test_server_still_serves_after_the_errors(client, server):
    # After the errors above: the process is healthy and answers as before.
    assert server.health() == (200, {"status": "ok"})
    r = chat(client, user(QUESTION))
    assert r.choices[0].message.content == answer_text(fresh(chat_ids(user(QUESTION))))
    assert server.proc.poll() is None


def test_readme_examples(server, capsys):
    # The "Serve a diffusion model" section: this module's server, then the
    # curl and openai examples against it.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Serve a diffusion model\n", 1)[1].split("\n## ", 1)[0]
    (_, serve), (_, curl), (_, python) = re.findall(
        r"```(\w+)\n(.*?)```", section, re.S
    )
    env = [f"{k}={v}" for k, v in SERVER_ENV.items()]
    words = shlex.split(serve)
    assert words[: len(env) + 1] == env + ["mlx_lm.server"]
    assert words[len(env) + 1 :: 2] == ["--model", "--port"]
    assert (ROOT / words[len(env) + 2]).resolve() == (GOLDEN / MODEL_NAME).resolve()
    port = server.url.rsplit(":", 1)[1]
    prompt = chat_ids(user(QUESTION))

    if shutil.which("curl") is not None:
        out = subprocess.run(
            ["bash", "-c", curl.replace("8080", port)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        expected = answer_text(fresh(prompt, threshold=0.5, cache="dual"))
        assert json.loads(out)["choices"][0]["message"]["content"] == expected

    exec(python.replace("8080", port), {})
    assert capsys.readouterr().out == (
        answer_text(fresh(prompt, reference=True, steps=4)) + "\n"
    )
