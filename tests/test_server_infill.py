"""Fill in the middle through mlx-lm's unchanged ``mlx_lm.server``: OpenAI's
``suffix`` of a text completion (``/v1/completions``).

For a diffusion model the canvas is the prompt, a gap of ``max_tokens``
masks and the suffix's tokens; the answer is the fill alone, the text of
``stream_generate(..., template=[max_tokens, suffix_ids])`` in this process.
An autoregressive model answers as mlx-lm does (it ignores ``suffix``). One
server serves the diffusion models (each request names its model by path).
"""

import pytest
from conftest import golden_dir, load_golden, serving
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from test_chat_terminal import make_autoregressive_model
from test_server import answer_text

openai = pytest.importorskip("openai")

LLADA = ("llada", "tiny-sharp")
DREAM = ("dream", "tiny-mha")
PROMPT = "def add(a, b):"
SUFFIX = "\n    return total\n"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(golden_dir(LLADA[0]) / LLADA[1], log) as served:
        yield served


def openai_client(served):
    url = served.url + "/v1"
    return openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def complete(client, model, stream=False, **kwargs):
    """A text completion's text (streamed chunks joined) and finish reason."""
    kwargs = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, **kwargs}
    r = client.completions.create(
        model=str(model), temperature=0.0, stream=stream, **kwargs
    )
    if not stream:
        return r.choices[0].text, r.choices[0].finish_reason
    chunks = list(r)
    return (
        "".join(c.choices[0].text for c in chunks),
        chunks[-1].choices[0].finish_reason,
    )


def in_process(family, name, suffix=None):
    """The fill (or, without a suffix, the completion) in this process."""
    model, tokenizer = load_golden(name, family)
    kwargs = {}
    if suffix is not None:
        suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
        kwargs["template"] = [MAX_TOKENS, suffix_ids]
    responses = stream_generate(
        model,
        tokenizer,
        tokenizer.encode(PROMPT),
        max_tokens=MAX_TOKENS,
        prompt_cache=make_prompt_cache(model),
        **kwargs,
    )
    return list(responses)


@pytest.mark.parametrize("family, name", [LLADA, DREAM], ids=["llada", "dream"])
def test_fill_is_the_in_process_fill(client, family, name):
    model = golden_dir(family) / name
    expected = in_process(family, name, SUFFIX)
    assert answer_text(expected)
    # The suffix changes the answer: it is not a plain completion.
    assert answer_text(expected) != answer_text(in_process(family, name))
    # Whole, streamed, and again (the server's prompt cache now has the prompt).
    for stream in (False, True, False):
        text, finish = complete(client, model, stream, suffix=SUFFIX)
        assert text == answer_text(expected)
        assert finish == expected[-1].finish_reason


def test_empty_suffix_is_no_suffix(client):
    model = golden_dir(LLADA[0]) / LLADA[1]
    expected = answer_text(in_process(*LLADA))
    assert complete(client, model, suffix="")[0] == expected
    assert complete(client, model, extra_body={"suffix": None})[0] == expected


TOO_LONG = "hello " * 4100  # the prompt and the gap fit in 4096 tokens, not this


@pytest.mark.parametrize(
    "chat, body, message",
    [
        (False, {"suffix": 7}, 'request\'s "suffix" must be a string: 7'),
        (False, {"suffix": ["x"]}, 'request\'s "suffix" must be a string'),
        (False, {"suffix": TOO_LONG}, "longer than the model's context"),
        (True, {"suffix": SUFFIX}, "is for text completions (/v1/completions)"),
    ],
    ids=["number", "list", "too-long", "chat"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_suffix_gets_a_clear_error(client, server, chat, body, message, stream):
    model = str(golden_dir(LLADA[0]) / LLADA[1])
    kwargs = dict(model=model, max_tokens=MAX_TOKENS, stream=stream, extra_body=body)
    with pytest.raises(openai.APIStatusError) as err:
        if chat:
            client.chat.completions.create(
                messages=[{"role": "user", "content": PROMPT}], **kwargs
            )
        else:
            client.completions.create(prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400
    assert message in err.value.body  # the server's {"error": ...}
    assert "Traceback" not in str(err.value.body)
    assert server.healthy()


def test_autoregressive_model_ignores_the_suffix(tmp_path):
    # A server of its own: mlx-lm (0.32.2) cannot switch from a model it
    # batches to one it cannot (the generation thread dies).
    llama = make_autoregressive_model(tmp_path / "tiny-llama")
    with serving(llama, tmp_path / "server.log") as served:
        client = openai_client(served)
        # Batched; with a seed, served alone through the code that gives a
        # diffusion model its suffix.
        for extra in ({}, {"seed": 3}):
            plain = complete(client, llama, extra_body=extra)
            assert plain[0]
            for suffix in (SUFFIX, 7, ""):
                body = {**extra, "suffix": suffix}
                assert complete(client, llama, extra_body=body) == plain
                assert complete(client, llama, True, extra_body=body) == plain
        assert served.healthy()
