"""Dream's sampling options, which draw random numbers and so are checked
statistically: temperature and top-k through mlx-lm's sampler, ``alg_temp``
(which positions a step commits), ``origin``; and Dream's settings through
mlx-lm's API (defaults, ``reference=True``, refusals)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_golden
from mlx_lm import stream_generate

from mlx_lm_llada import diffusion_generate

MASK, EOS, IM_END = 484, 480, 482


def dream(name="tiny-gqa"):
    return load_golden(name, "dream")


def softmax(z, t=1.0):
    z = np.exp((z - z.max()) / t)
    return z / z.sum()


def tv(p, q):
    return 0.5 * np.abs(p - q).sum()


def test_temperature_and_top_k_sample_from_the_shifted_logits():
    model, tokenizer = dream()
    prompt = tokenizer.encode("x")
    # The one new token is read from the last prompt position's logits.
    logits = np.array(model(mx.array([prompt + [MASK]]))[0], dtype=np.float64)
    T, K, seeds, rows = 0.25, 8, 150, 10

    def expected(row, t):
        top = np.argsort(-row)[:K]
        p = np.zeros_like(row)
        p[top] = softmax(row[top], t)
        return p

    counts = np.zeros(logits.shape[-1])
    for seed in range(seeds):
        mx.random.seed(seed)
        out, nfe = diffusion_generate(
            model,
            mx.array([prompt] * rows),
            max_new_tokens=1,
            steps=1,
            alg="maskgit_plus",
            temperature=T,
            top_k=K,
        )
        assert nfe == 1
        np.add.at(counts, np.array(out)[:, -1], 1)
    freq = counts / counts.sum()
    p = expected(logits[-2], T)
    assert (freq[p == 0] == 0).all()  # only the top k
    # Sampling noise at 1500 draws is about 0.05.
    assert tv(freq, p) < 0.12
    assert tv(freq, expected(logits[-2], 2 * T)) > 0.2
    assert tv(freq, expected(logits[-1], T)) > 0.5  # the unshifted position


def test_top_p_is_mlx_lms_nucleus_on_the_shifted_logits():
    model, tokenizer = dream()
    prompt = tokenizer.encode("x")
    logits = np.array(model(mx.array([prompt + [MASK]]))[0, -2], dtype=np.float64)
    T, top_p = 0.7, 0.3
    # mlx-lm's nucleus: the most probable tokens (untempered) until their
    # mass reaches top_p, then sampled at temperature T.
    p = softmax(logits)
    order = np.argsort(-p)
    kept = order[np.cumsum(p[order]) - p[order] < top_p]
    expected = np.zeros_like(p)
    expected[kept] = softmax(logits[kept], T)
    counts = np.zeros_like(p)
    for seed in range(200):
        mx.random.seed(seed)
        out, _ = diffusion_generate(
            model,
            mx.array([prompt] * 10),
            max_new_tokens=1,
            steps=1,
            alg="maskgit_plus",
            temperature=T,
            top_p=top_p,
        )
        np.add.at(counts, np.array(out)[:, -1], 1)
    freq = counts / counts.sum()
    assert (freq[expected == 0] == 0).all()
    # About 40 tokens kept: sampling noise at 2000 draws is about 0.06.
    assert tv(freq, expected) < 0.15
    assert tv(freq, softmax(logits, T)) > 0.4  # top_p ignored


def first_committed(model, prompt, n, **params):
    steps = []
    diffusion_generate(
        model,
        mx.array([prompt]),
        max_new_tokens=n,
        steps=n,
        on_step=lambda st: steps.append(st.committed[0].copy()),
        **params,
    )
    return steps[0]


def test_alg_temp_samples_positions_by_softmax_of_confidence():
    model, tokenizer = dream()
    prompt = tokenizer.encode("hello there")
    P, n, alg_temp = len(prompt), 6, 0.05
    # The first call that commits (one token: Dream's schedule commits none
    # at the first step) sees the prompt and n masks.
    logits = model(mx.array([prompt + [MASK] * n]))[0]
    logits = np.array(logits[P - 1 : P + n - 1], dtype=np.float64)
    logits[:, MASK] = -np.inf
    conf = np.array([softmax(row).max() for row in logits])
    expected = softmax(conf, alg_temp)
    assert expected.max() < 0.9  # a spread, not one sure position
    counts = np.zeros(n)
    for seed in range(300):
        mx.random.seed(seed)
        first = first_committed(model, prompt, n, alg="maskgit_plus", alg_temp=alg_temp)
        assert len(first) == 1
        counts[first[0] - P] += 1
    freq = counts / counts.sum()
    assert tv(freq, expected) < 0.12
    greedy = np.eye(n)[np.argmax(conf)]
    assert tv(freq, greedy) > 0.2
    # alg_temp 0 is the most confident position, every time.
    assert first_committed(model, prompt, n, alg="maskgit_plus")[0] == P + np.argmax(
        conf
    )


def test_origin_commits_each_position_with_the_schedule_probability():
    model, tokenizer = dream()
    prompt = tokenizer.encode("hello")
    n, steps = 16, 4
    ts = np.linspace(1, 1e-3, steps + 1)
    share = 1 - ts[1] / ts[0]
    firsts = []
    for seed in range(60):
        mx.random.seed(seed)
        calls = []
        out, nfe = diffusion_generate(
            model,
            mx.array([prompt]),
            max_new_tokens=n,
            steps=steps,
            alg="origin",
            on_step=lambda st: calls.append(len(st.committed[0])),
        )
        assert nfe == steps and sum(calls) == n
        assert (np.array(out) != MASK).all()
        firsts.append(calls[0])
    # Binomial(16, 0.25): mean 4, standard error of 60 draws about 0.22.
    assert abs(np.mean(firsts) - n * share) < 0.8
    assert np.std(firsts) > 0.5  # a random count, not a fixed one


def stream_tokens(model, tokenizer, prompt, max_tokens, **settings):
    steps = []
    tokens = [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=max_tokens,
            on_step=lambda st: steps.append(st),
            **settings,
        )
    ]
    return tokens, steps


def test_defaults_are_fast_dllm_and_reference_is_dreams_loop():
    model, tokenizer = dream("tiny-sharp")
    prompt = tokenizer.encode("one two three")
    tokens, steps = stream_tokens(model, tokenizer, prompt, 64)
    assert {st.block_length for st in steps} == {32}
    expected, _ = diffusion_generate(
        model,
        mx.array([prompt]),
        max_new_tokens=64,
        steps=64,
        alg="confidence_threshold",
        threshold=0.9,
        block_length=32,
        dual_cache=True,
    )
    assert tokens == cut(np.array(expected)[0, len(prompt) :].tolist())

    tokens, steps = stream_tokens(model, tokenizer, prompt, 24, reference=True)
    assert {st.block_length for st in steps} == {24}
    expected, nfe = diffusion_generate(
        model, mx.array([prompt]), max_new_tokens=24, steps=24, alg="maskgit_plus"
    )
    assert tokens == cut(np.array(expected)[0, len(prompt) :].tolist())
    assert steps[-1].nfe <= nfe


def cut(gen):
    """Tokens up to and including the first end token."""
    for i, t in enumerate(gen):
        if t in (EOS, IM_END):
            return gen[: i + 1]
    return gen


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"reference": True, "cache": "dual"}, "Dream's exact reference"),
        ({"reference": True, "block_length": 8}, "block_length"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"remasking": "origin", "threshold": 0.9}, "origin"),
        ({"alg_temp": -1.0}, "alg_temp must be >= 0"),
        ({"capped_threshold": True, "threshold": None}, "set threshold"),
    ],
)
def test_impossible_dream_settings(settings, message):
    model, tokenizer = dream()
    with pytest.raises(ValueError, match=message):
        list(stream_generate(model, tokenizer, "hi", max_tokens=8, **settings))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"alg": "greedy"}, "alg must be one of"),
        ({"output_history": True}, "output_history"),
        ({"gen_length": 8}, "gen_length"),
    ],
)
def test_dream_reference_arguments_are_dreams(params, message):
    model, _ = dream()
    with pytest.raises(ValueError, match=message):
        diffusion_generate(model, mx.array([[1, 2]]), **params)


def test_left_padding_is_required():
    model, _ = dream()
    with pytest.raises(ValueError, match="pad on the left"):
        diffusion_generate(
            model,
            mx.array([[1, 2, 3]]),
            attention_mask=mx.array([[1, 0, 1]]),
            max_new_tokens=4,
            steps=4,
            alg="entropy",
        )


@pytest.mark.parametrize("remasking", ["topk_margin", "entropy"])
def test_confidence_functions_serve_llada_too(remasking):
    model, tokenizer = load_golden("tiny-gqa")
    tokens = [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            "hello",
            max_tokens=16,
            block_length=16,
            steps=16,
            reference=True,
            remasking=remasking,
        )
    ]
    assert 0 < len(tokens) <= 16
