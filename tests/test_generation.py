"""Generation through mlx-lm's own Python API: chat turns, streaming, end
tokens, temperature, settings precedence and refusals."""

import gc
import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import GOLDEN, case_id, golden_cases, load_golden
from mlx_lm import batch_generate, generate, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_lm_llada import diffusion_generate
from mlx_lm_llada.plugin_settings import set_command_settings

CHAT = golden_cases("chat")
BOS, EOS, MASK, EOT = 480, 481, 482, 485  # cases.json special_token_ids
END_TEXTS = ("<|endoftext|>", "<|eot_id|>")


def test_special_ids(golden_special_ids):
    assert (BOS, EOS, MASK, EOT) == tuple(
        golden_special_ids[t]
        for t in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>")
    )


def run_stream(model, tokenizer, prompt, **kwargs):
    """stream_generate, with the canvas after every model call.

    Returns the responses, the steps as ``(canvas copy, nfe)`` and, for each
    response, how many model calls had run when it arrived.
    """
    steps, responses, arrived = [], [], []

    def on_step(st):
        steps.append((st.canvas[0].copy(), st.nfe))

    for r in stream_generate(model, tokenizer, prompt, on_step=on_step, **kwargs):
        responses.append(r)
        arrived.append(len(steps))
    return responses, steps, arrived


def reference(model, prompt, cut=None, **kwargs):
    """The generated part of diffusion_generate's canvas, cut after ``cut``
    tokens or at (and including) the first end token."""
    tokens, nfe = diffusion_generate(model, mx.array([prompt]), **kwargs)
    gen = np.array(tokens)[0, len(prompt) :].tolist()
    ends = [i for i, t in enumerate(gen) if t in (EOS, EOT)]
    if ends:
        gen = gen[: ends[0] + 1]
    return gen[:cut], nfe


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


def model_copy(tmp_path, name="tiny-mha", config=None, generation_config=None):
    """A copy of a golden checkpoint with some config.json keys changed."""
    path = tmp_path / name
    shutil.copytree(GOLDEN / name, path)
    for file, changes in (
        ("config.json", config),
        ("generation_config.json", generation_config),
    ):
        if changes:
            data = json.loads((path / file).read_text())
            data.update(changes)
            (path / file).write_text(json.dumps(data))
    return mlx_lm.load(str(path))


# 1. Golden chat cases, the way mlx_lm.chat drives them.


@pytest.mark.parametrize("case", CHAT, ids=case_id)
def test_golden_chat_through_mlx_lm(case):
    model, tokenizer = load_golden(case["model"])
    params = case["params"]
    assert params["temperature"] == 0 and params["remasking"] == "low_confidence"
    gen_length = params["gen_length"]
    prompt_cache = make_prompt_cache(model)
    assert len(case["turns"]) >= 2
    for turn in case["turns"]:
        responses, steps, _ = run_stream(
            model,
            tokenizer,
            chat_prompt(tokenizer, turn["user"]),
            max_tokens=gen_length,
            sampler=make_sampler(0.0),
            prompt_cache=prompt_cache,
            prefill_step_size=2048,
            steps=params["steps"],
            block_length=params["block_length"],
            reference=True,
        )
        context = turn["context_ids"][0]
        canvas = steps[0][0]
        assert len(canvas) == len(context) + gen_length
        assert canvas[: len(context)].tolist() == context
        assert [r.token for r in responses] == turn["output_ids"][0][len(context) :]
        assert "".join(r.text for r in responses) == turn["answer_text"]
        assert responses[-1].finish_reason == "length"
        assert len(steps) == params["steps"]


@pytest.mark.parametrize(
    "first, end, settings",
    [("Thanks!", EOS, {}), ("hello", EOT, {"logits_eos_inf": True})],
    ids=["eos", "eot"],
)
def test_chat_context_after_an_end_token(first, end, settings):
    # chat.py's rules: later turns drop their BOS; the answer is kept up to
    # and including <|eot_id|>, without <|endoftext|>.
    model, tokenizer = load_golden("tiny-eos")
    kwargs = dict(max_tokens=32, block_length=32, reference=True, **settings)
    prompt_cache = make_prompt_cache(model)
    t1 = chat_prompt(tokenizer, first)
    r1, s1, _ = run_stream(model, tokenizer, t1, prompt_cache=prompt_cache, **kwargs)
    answer = [r.token for r in r1]
    assert len(answer) > 1 and answer[-1] == end and r1[-1].finish_reason == "stop"
    assert not any(t in r.text for r in r1 for t in END_TEXTS)
    assert s1[0][0][: len(t1)].tolist() == t1

    t2 = chat_prompt(tokenizer, "And then?")
    assert t2[0] == BOS
    r2, s2, _ = run_stream(model, tokenizer, t2, prompt_cache=prompt_cache, **kwargs)
    kept = answer if end == EOT else answer[:-1]
    context = t1 + kept + t2[1:]
    canvas = s2[0][0]
    assert canvas.tolist()[: len(context)] == context
    assert len(canvas) == len(context) + 32
    expected, _ = reference(
        model, context, steps=32, gen_length=32, block_length=32, **settings
    )
    assert [r.token for r in r2] == expected


# 4. Streaming.


def test_stream_order_text_and_metadata():
    model, tokenizer = load_golden("tiny-mha")
    prompt = chat_prompt(tokenizer, "hello")
    P = len(prompt)
    # 20 is not a multiple of the block: the canvas is 24, and the reference
    # schedule's steps default to 24.
    responses, steps, arrived = run_stream(
        model, tokenizer, prompt, max_tokens=20, block_length=8, reference=True
    )
    tokens = [r.token for r in responses]
    assert len(tokens) == 20
    expected, _ = reference(model, prompt, steps=24, gen_length=24, block_length=8)
    assert tokens == expected[:20]
    assert len(steps[0][0]) == P + 24

    text = "".join(r.text for r in responses)
    assert text == generate(
        model, tokenizer, prompt, max_tokens=20, block_length=8, reference=True
    )
    assert text == tokenizer.decode(tokens)

    assert [r.finish_reason for r in responses] == [None] * 19 + ["length"]
    assert [r.generation_tokens for r in responses] == list(range(1, 21))
    assert all(r.prompt_tokens == P for r in responses)
    assert all(r.peak_memory > 0 for r in responses)

    # Each token arrives right after the call that completes its prefix.
    for i, n in enumerate(arrived):
        first_done = next(
            k + 1 for k, (c, _) in enumerate(steps) if (c[P : P + i + 1] != MASK).all()
        )
        assert n == first_done, i
        assert steps[n - 1][0][P + i] == tokens[i]
    assert arrived[0] <= 8 < len(steps)  # the first block streams early

    for r in responses:
        lp = np.array(r.logprobs, dtype=np.float64)
        assert lp.shape == (model.args.embedding_size,)
        assert np.isfinite(lp).all()
        assert abs(np.log(np.exp(lp).sum())) < 1e-4
        assert lp[r.token] == lp.max()


@pytest.mark.parametrize(
    "text, template, block_length",
    [("abc", False, 32), ("Thanks!", True, 32), ("hello", True, 8)],
)
def test_stream_stops_at_eos(text, template, block_length):
    model, tokenizer = load_golden("tiny-eos")
    prompt = chat_prompt(tokenizer, text) if template else tokenizer.encode(text)
    responses, steps, _ = run_stream(
        model,
        tokenizer,
        prompt,
        max_tokens=32,
        block_length=block_length,
        reference=True,
    )
    tokens = [r.token for r in responses]
    expected, _ = reference(
        model, prompt, steps=32, gen_length=32, block_length=block_length
    )
    assert tokens == expected and tokens[-1] == EOS
    assert responses[-1].finish_reason == "stop"
    out = "".join(r.text for r in responses)
    assert out == tokenizer.decode(tokens[:-1])
    assert not any(t in out for t in END_TEXTS)
    # No model call after the one that closed the answer.
    _, stop_nfe = reference(
        model,
        prompt,
        steps=32,
        gen_length=32,
        block_length=block_length,
        early_stop=True,
    )
    assert steps[-1][1] == stop_nfe
    if block_length == 8:
        assert stop_nfe < 32


def test_stream_stops_at_eot():
    model, tokenizer = load_golden("tiny-eos")
    assert {EOS, EOT} <= set(tokenizer.eos_token_ids)
    prompt = chat_prompt(tokenizer, "hello")
    responses, _, _ = run_stream(
        model, tokenizer, prompt, max_tokens=32, logits_eos_inf=True, reference=True
    )
    tokens = [r.token for r in responses]
    expected, _ = reference(
        model, prompt, steps=32, gen_length=32, block_length=32, logits_eos_inf=True
    )
    assert tokens == expected and tokens[-1] == EOT and len(tokens) > 1
    assert responses[-1].finish_reason == "stop"
    assert np.array(responses[-1].logprobs)[EOS] == -np.inf
    out = "".join(r.text for r in responses)
    assert out and not any(t in out for t in END_TEXTS)


@pytest.mark.parametrize("settings", [{}, {"logits_eos_inf": True}])
def test_generate_step_returns_after_an_end_token(settings):
    # mlx_lm.generate.generate_step defers to the model and ends the answer
    # itself, for any caller that does not check eos_token_ids.
    from mlx_lm.generate import generate_step

    model, tokenizer = load_golden("tiny-eos")
    prompt = chat_prompt(tokenizer, "hello")
    out = [
        (t, lp)
        for t, lp in generate_step(
            mx.array(prompt),
            model,
            max_tokens=32,
            block_length=32,
            reference=True,
            **settings,
        )
    ]
    tokens = [t for t, _ in out]
    expected, _ = reference(
        model, prompt, steps=32, gen_length=32, block_length=32, **settings
    )
    assert tokens == expected and tokens[-1] in (EOS, EOT)
    assert all(t not in (EOS, EOT) for t in tokens[:-1])


def test_default_settings_of_unchanged_commands():
    # No settings at all: blocks of 32, Fast-dLLM's dual cache and threshold
    # 0.9; the answer ends at its first end token.
    for name in ("tiny-mha", "tiny-eos", "tiny-sharp"):
        model, tokenizer = load_golden(name)
        prompt = chat_prompt(tokenizer, "Tell me a story")
        responses, steps, _ = run_stream(model, tokenizer, prompt, max_tokens=64)
        expected, nfe = reference(
            model,
            prompt,
            steps=64,
            gen_length=64,
            block_length=32,
            cache="dual",
            threshold=0.9,
            early_stop=True,
        )
        assert [r.token for r in responses] == expected
        assert len(steps[0][0]) == len(prompt) + 64
        assert steps[-1][1] == nfe
        if name == "tiny-mha":  # never 0.9 sure: one token per call
            assert len(expected) == 64 and nfe == 64
        elif name == "tiny-sharp":  # sure enough to commit several per call
            assert len(expected) == 64 and nfe < 64
        else:  # an answer that is just <|endoftext|>
            assert expected == [EOS] and nfe < 64


def test_reference_setting_gives_the_reference_schedule(monkeypatch):
    # reference=True: one step per canvas token, blocks of 32, no cache, no
    # threshold, whatever the model's defaults say.
    for name in ("tiny-mha", "tiny-eos", "tiny-sharp"):
        model, tokenizer = load_golden(name)
        prompt = chat_prompt(tokenizer, "Tell me a story")
        responses, steps, _ = run_stream(
            model, tokenizer, prompt, max_tokens=64, reference=True
        )
        ref = dict(steps=64, gen_length=64, block_length=32, cache="none")
        expected, full_nfe = reference(model, prompt, **ref)
        stopped, nfe = reference(model, prompt, early_stop=True, **ref)
        assert stopped == expected
        assert [r.token for r in responses] == expected
        assert len(steps[0][0]) == len(prompt) + 64
        assert steps[-1][1] == nfe
        if name == "tiny-eos":
            assert expected == [EOS] and nfe < full_nfe == 64
        else:  # one token per call, in both blocks
            assert len(expected) == 64 and nfe == 64

    # It is the exact schedule: a cache or a parallel rule in the same call
    # (or from outside it) is a contradiction, named.
    model, tokenizer = load_golden("tiny-mha")
    for clash, name in (
        (dict(cache="dual"), "cache"),
        (dict(cache="prefix"), "cache"),
        (dict(threshold=0.5), "threshold"),
        (dict(factor=1.0), "factor"),
    ):
        with pytest.raises(ValueError, match=f"reference=True.*combined with {name}"):
            list(
                stream_generate(
                    model, tokenizer, [BOS, 65], max_tokens=8, reference=True, **clash
                )
            )
    monkeypatch.setenv("MLX_LM_LLADA_REFERENCE", "1")
    with pytest.raises(ValueError, match="reference=True.*combined with cache"):
        list(stream_generate(model, tokenizer, [BOS, 65], max_tokens=8, cache="dual"))
    # Turning them off in the call, under MLX_LM_LLADA_REFERENCE=1, is none.
    tokens = [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            [BOS, 65],
            max_tokens=8,
            block_length=8,
            cache="none",
            threshold=None,
            factor=None,
        )
    ]
    expected, _ = reference(model, [BOS, 65], steps=8, gen_length=8, block_length=8)
    assert tokens == expected


# 5. Temperature.


def test_temperature_samples_softmax_over_t():
    model, tokenizer = load_golden("tiny-gqa")
    prompt = tokenizer.encode("a")
    T, seeds, rows = 0.5, 200, 10
    logits = np.array(model(mx.array([prompt + [MASK]]))[0, -1], dtype=np.float64)

    def softmax(t):
        z = np.exp((logits - logits.max()) / t)
        return z / z.sum()

    p = softmax(T)
    assert np.exp(-(p * np.log(p)).sum()) > 5  # spread, not peaked

    sampler = make_sampler(temp=T)
    counts = np.zeros_like(p)
    for seed in range(seeds):
        mx.random.seed(seed)
        out, nfe = diffusion_generate(
            model,
            mx.array([prompt] * rows),
            steps=1,
            gen_length=1,
            block_length=1,
            sampler=sampler,
        )
        assert nfe == 1
        np.add.at(counts, np.array(out)[:, -1], 1)
    freq = counts / counts.sum()

    def tv(q):
        return 0.5 * np.abs(freq - q).sum()

    # Sampling noise at 2000 draws is about 0.09; a wrong temperature is > 0.35.
    assert tv(p) < 0.2
    for wrong in (2 * T, T / 2, 1.0):
        assert tv(softmax(wrong)) > 0.3, wrong


class MaskLover:
    """A model whose favourite prediction is the mask token itself."""

    def __init__(self, model):
        self.model, self.layers, self.diffusion = model, model.layers, model.diffusion

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        return logits + 100.0 * (mx.arange(logits.shape[-1]) == MASK)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mask_token_is_never_proposed(temperature):
    # Committing a proposed mask would leave the position masked: more calls
    # than steps, and no end at all at temperature 0.
    model, _ = load_golden("tiny-mha")

    def guard(st):
        assert st.nfe <= 8, "ran past its steps"

    tokens, nfe = diffusion_generate(
        MaskLover(model),
        mx.array([[BOS, 65, 66]]),
        steps=8,
        gen_length=8,
        block_length=8,
        temperature=temperature,
        on_step=guard,
    )
    assert nfe == 8
    assert MASK not in np.array(tokens)[0, 3:].tolist()


def test_stream_generate_draws_with_the_given_sampler():
    model, tokenizer = load_golden("tiny-gqa")
    prompt = tokenizer.encode("a")
    sampler = make_sampler(temp=0.5)
    drawn = []
    for seed in range(6):
        mx.random.seed(seed)
        (r,) = stream_generate(
            model, tokenizer, prompt, max_tokens=1, block_length=1, sampler=sampler
        )
        mx.random.seed(seed)
        out, _ = diffusion_generate(
            model,
            mx.array([prompt]),
            steps=1,
            gen_length=1,
            block_length=1,
            temperature=0.5,
        )
        assert r.token == np.array(out)[0, -1]
        drawn.append(r.token)
    assert len(set(drawn)) > 1  # really sampled


# 6. Refusals and impossible settings.


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_batch_generate_refused():
    model, tokenizer = load_golden("tiny-mha")
    with pytest.raises(ValueError, match="Batched generation.*diffusion"):
        batch_generate(model, tokenizer, [chat_prompt(tokenizer, "hi")], max_tokens=4)
    gc.collect()  # the refused BatchGenerator is deleted quietly


def test_draft_model_refused():
    model, tokenizer = load_golden("tiny-mha")
    with pytest.raises(ValueError, match="Speculative decoding.*draft"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=4, draft_model=model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=2, gen_length=32, block_length=8), r"steps \(2\) is smaller"),
        (dict(steps=3, gen_length=32, block_length=16), r"multiple of the number"),
        (dict(steps=8, gen_length=8, block_length=0), "block_length must be pos"),
        (dict(steps=8, gen_length=8, block_length=-8), "block_length must be pos"),
        (dict(steps=20, gen_length=20, block_length=8), r"gen_length \(20\) must"),
        (dict(gen_length=8, block_length=8, remasking="bogus"), "remasking"),
        (dict(gen_length=8, block_length=8, cache="bogus"), "cache must be"),
        (dict(gen_length=8, block_length=8, threshold=1.5), "threshold"),
        (dict(gen_length=8, block_length=8, cfg_scale=-1.0), "cfg_scale"),
    ],
)
def test_impossible_settings(kwargs, message):
    model, _ = load_golden("tiny-mha")
    kwargs.setdefault("steps", kwargs["gen_length"])
    with pytest.raises(ValueError, match=message):
        diffusion_generate(model, mx.array([[BOS, 65, 66]]), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(max_tokens=32, block_length=8, steps=2, reference=True),
            r"steps \(2\) is smaller",
        ),
        (
            dict(max_tokens=32, block_length=16, steps=3, threshold=None),
            r"steps \(3\) must be a multiple of the number of blocks",
        ),
        (dict(max_tokens=8, block_length=0), "block_length must be positive"),
        (dict(max_tokens=8, cache="bogus"), "cache must be"),
        (dict(max_tokens=-1), "max_tokens must be positive"),
        (dict(max_tokens=8, stepz=3), "Unknown diffusion setting.*stepz"),
        (dict(max_tokens=8, kv_bits=4), "kv_bits"),
        (dict(max_tokens=8, max_kv_size=64), "max_kv_size"),
        (
            dict(
                max_tokens=8,
                logits_processors=make_logits_processors(repetition_penalty=1.2),
            ),
            "Logits processors",
        ),
    ],
)
def test_stream_refuses(kwargs, message):
    model, tokenizer = load_golden("tiny-mha")
    with pytest.raises(ValueError, match=message):
        list(stream_generate(model, tokenizer, [BOS, 65, 66], **kwargs))


def test_unknown_or_unreadable_setting_in_environment(monkeypatch):
    model, tokenizer = load_golden("tiny-mha")
    monkeypatch.setenv("MLX_LM_LLADA_STEPZ", "3")
    with pytest.raises(ValueError, match="stepz.*MLX_LM_LLADA_"):
        list(stream_generate(model, tokenizer, [BOS, 65], max_tokens=8))
    monkeypatch.delenv("MLX_LM_LLADA_STEPZ")
    monkeypatch.setenv("MLX_LM_LLADA_STEPS", "many")
    with pytest.raises(ValueError, match="steps.*many"):
        list(stream_generate(model, tokenizer, [BOS, 65], max_tokens=8))


def test_empty_prompt_refused():
    model, tokenizer = load_golden("tiny-mha")
    with pytest.raises(ValueError, match="prompt is empty"):
        diffusion_generate(model, mx.zeros((1, 0), mx.int32), steps=8, gen_length=8)
    with pytest.raises(ValueError, match="prompt is empty"):
        list(stream_generate(model, tokenizer, [], max_tokens=8))


def test_context_longer_than_the_model_refused(tmp_path):
    model, tokenizer = model_copy(tmp_path, config={"max_sequence_length": 40})
    assert model.args.max_sequence_length == 40
    fits = [BOS] + [65] * 7  # 8 + a canvas of 32 = 40
    (tokens, _) = diffusion_generate(
        model, mx.array([fits]), steps=32, gen_length=32, block_length=32
    )
    assert tokens.shape == (1, 40)
    assert len(list(stream_generate(model, tokenizer, fits, max_tokens=32))) == 32
    too_long = fits + [66]
    with pytest.raises(ValueError, match="max_sequence_length 40"):
        diffusion_generate(
            model, mx.array([too_long]), steps=32, gen_length=32, block_length=32
        )
    with pytest.raises(ValueError, match="max_sequence_length 40"):
        list(stream_generate(model, tokenizer, too_long, max_tokens=32))
    # max_tokens rounds up to whole blocks: 25 tokens need a canvas of 32.
    with pytest.raises(ValueError, match="max_sequence_length 40"):
        list(stream_generate(model, tokenizer, too_long, max_tokens=25))
    # The conversation in the prompt cache counts too.
    prompt_cache = make_prompt_cache(model)
    list(
        stream_generate(model, tokenizer, fits, max_tokens=8, prompt_cache=prompt_cache)
    )
    with pytest.raises(ValueError, match="max_sequence_length 40"):
        list(
            stream_generate(
                model, tokenizer, [65] * 8, max_tokens=8, prompt_cache=prompt_cache
            )
        )


# 7. Settings precedence.


def nfe_and_tokens(model, tokenizer, prompt, **kwargs):
    responses, steps, _ = run_stream(model, tokenizer, prompt, **kwargs)
    return steps[-1][1], [r.token for r in responses]


def test_environment_settings(monkeypatch):
    model, tokenizer = load_golden("tiny-mha")
    prompt = chat_prompt(tokenizer, "hello")
    # The reference schedule, asked for by the environment: one block of 32,
    # 32 steps.
    monkeypatch.setenv("MLX_LM_LLADA_REFERENCE", "1")
    expected, _ = reference(model, prompt, steps=32, gen_length=32, block_length=32)
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=16) == (
        32,
        expected[:16],
    )

    monkeypatch.setenv("MLX_LM_LLADA_BLOCK_LENGTH", "8")
    monkeypatch.setenv("MLX_LM_LLADA_STEPS", "8")
    expected, _ = reference(model, prompt, steps=8, gen_length=16, block_length=8)
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=16) == (8, expected)

    # The call's keyword arguments win over the environment.
    expected, _ = reference(model, prompt, steps=16, gen_length=16, block_length=8)
    got = nfe_and_tokens(model, tokenizer, prompt, max_tokens=16, steps=16)
    assert got == (16, expected)

    # Our commands' flags sit between the two.
    set_command_settings(steps=4)
    expected, _ = reference(model, prompt, steps=4, gen_length=16, block_length=8)
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=16) == (4, expected)
    got = nfe_and_tokens(model, tokenizer, prompt, max_tokens=16, steps=16)
    assert got[0] == 16


def test_environment_threshold(monkeypatch):
    model, tokenizer = load_golden("tiny-sharp")
    prompt = chat_prompt(tokenizer, "hello")
    monkeypatch.setenv("MLX_LM_LLADA_THRESHOLD", "0.5")
    monkeypatch.setenv("MLX_LM_LLADA_BLOCK_LENGTH", "16")
    # The model's default cache (dual) stays in force.
    expected, ref_nfe = reference(
        model,
        prompt,
        steps=32,
        gen_length=32,
        block_length=16,
        threshold=0.5,
        cache="dual",
        early_stop=True,
    )
    nfe, tokens = nfe_and_tokens(model, tokenizer, prompt, max_tokens=32)
    assert (nfe, tokens) == (ref_nfe, expected)
    assert nfe < 32  # several tokens per step

    # "none" turns the model's default threshold off: the steps count again.
    monkeypatch.setenv("MLX_LM_LLADA_THRESHOLD", "none")
    expected, ref_nfe = reference(
        model,
        prompt,
        steps=32,
        gen_length=32,
        block_length=16,
        cache="dual",
        early_stop=True,
    )
    nfe, tokens = nfe_and_tokens(model, tokenizer, prompt, max_tokens=32)
    assert (nfe, tokens) == (ref_nfe, expected) and nfe == 32
    monkeypatch.setenv("MLX_LM_LLADA_STEPS", "8")
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=32)[0] == 8

    # The reference schedule, one step per canvas token.
    monkeypatch.delenv("MLX_LM_LLADA_THRESHOLD")
    monkeypatch.delenv("MLX_LM_LLADA_STEPS")
    monkeypatch.setenv("MLX_LM_LLADA_REFERENCE", "1")
    expected, _ = reference(model, prompt, steps=32, gen_length=32, block_length=16)
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=32) == (32, expected)
    # ... which a threshold from the environment contradicts.
    monkeypatch.setenv("MLX_LM_LLADA_THRESHOLD", "0.5")
    with pytest.raises(ValueError, match="reference=True.*combined with threshold"):
        nfe_and_tokens(model, tokenizer, prompt, max_tokens=32)


def test_generation_config_defaults(tmp_path, monkeypatch):
    # The checkpoint asks for the reference schedule, in blocks of 8, 8 steps.
    model, tokenizer = model_copy(
        tmp_path,
        generation_config={
            "diffusion": {"block_length": 8, "steps": 8, "reference": True}
        },
    )
    prompt = chat_prompt(tokenizer, "hello")
    expected, _ = reference(model, prompt, steps=8, gen_length=16, block_length=8)
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=16) == (8, expected)

    monkeypatch.setenv("MLX_LM_LLADA_STEPS", "16")
    expected, _ = reference(model, prompt, steps=16, gen_length=16, block_length=8)
    assert nfe_and_tokens(model, tokenizer, prompt, max_tokens=16) == (16, expected)
    got = nfe_and_tokens(model, tokenizer, prompt, max_tokens=16, steps=4)
    assert got[0] == 4


def test_generation_config_unknown_setting(tmp_path):
    model, tokenizer = model_copy(
        tmp_path, generation_config={"diffusion": {"stepz": 8}}
    )
    with pytest.raises(ValueError, match="stepz.*generation defaults"):
        list(stream_generate(model, tokenizer, [BOS, 65], max_tokens=8))


def test_a_flag_may_rely_on_the_models_defaults():
    # Pairs are checked on the settings in force: Dream's default threshold
    # makes --capped-threshold valid, LLaDA's default cache --dual-window.
    from mlx_lm import stream_generate

    dream, dream_tokenizer = load_golden("tiny-mha", "dream")
    set_command_settings(capped_threshold=True, block_length="none")
    out = list(stream_generate(dream, dream_tokenizer, "hello", max_tokens=8))
    assert out
    set_command_settings(dual_window="tail")
    model, tokenizer = load_golden("tiny-mha")
    assert list(stream_generate(model, tokenizer, "hello", max_tokens=8))
    # A pair that the defaults do not rescue is refused when generation
    # starts, by name.
    set_command_settings(cache="prefix", dual_window="tail")
    with pytest.raises(ValueError, match="a mode of the dual cache"):
        list(stream_generate(model, tokenizer, "hello", max_tokens=8))
    set_command_settings(factor=1.0)  # beside LLaDA's default threshold
    with pytest.raises(ValueError, match="two rules"):
        list(stream_generate(model, tokenizer, "hello", max_tokens=8))
