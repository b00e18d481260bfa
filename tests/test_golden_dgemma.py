"""DiffusionGemma's loop against the reference's outputs
(tests/fixtures/golden/dgemma): transformers' ``generate`` under the golden
README's deterministic noise and argmax sampler, token for token with the
same number of decoder calls; the chat template; what the strategy refuses
for a uniform-noise model.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import golden_cases, golden_dir, load_golden

from mlx_lm_llada import diffusion_generate

FAMILY = "dgemma"
GENERATE = golden_cases("generate", FAMILY)
GENERATE = [c for c in GENERATE if c["kind"] in ("generate", "generate_batch")]
CHAT = golden_cases("chat", FAMILY)
CASES = json.loads((golden_dir(FAMILY) / "cases.json").read_text())
V = CASES["vocab_size"]


def load(name="tiny-a"):
    return load_golden(name, FAMILY)


def golden_noise(k, shape):
    """The golden README's k-th draw: (1000003 k + 7919 b + 104729 j + 12345)
    mod vocab_size, for row b and canvas position j."""
    B, C = shape
    b, j = np.arange(B)[:, None], np.arange(C)[None]
    return mx.array((1000003 * k + 7919 * b + 104729 * j + 12345) % V)


def argmax(logprobs):
    return mx.argmax(logprobs, axis=-1)


def run(case, **params):
    model, _ = load(case["model"])
    mask = case.get("attention_mask")
    calls = []
    tokens, nfe = diffusion_generate(
        model,
        mx.array(case["prompt_ids"]),
        attention_mask=None if mask is None else mx.array(mask),
        noise=golden_noise,
        sampler=argmax,
        on_step=lambda s: calls.append(s.block),
        **{**case["params"], **params},
    )
    return np.array(tokens).tolist(), nfe, calls


def case_name(case):
    return f"{case['model']}-{case.get('label')}"


@pytest.mark.parametrize("case", GENERATE, ids=case_name)
def test_reference_generate(case):
    tokens, nfe, calls = run(case)
    assert tokens == case["output_ids"]
    assert nfe == case["decoder_calls"]
    if "steps_per_canvas" in case:
        per_canvas = [calls.count(c) for c in sorted(set(calls))]
        assert per_canvas == case["steps_per_canvas"]


@pytest.mark.parametrize(
    "render", CHAT[0]["renders"], ids=lambda r: f"thinking={r['enable_thinking']}"
)
def test_chat_template_and_answer(render):
    (case,) = CHAT
    model, tokenizer = load(case["model"])
    ids = tokenizer.apply_chat_template(
        case["messages"],
        add_generation_prompt=True,
        enable_thinking=render["enable_thinking"],
    )
    assert ids == render["prompt_ids"][0]
    tokens, nfe = diffusion_generate(
        model,
        mx.array(render["prompt_ids"]),
        noise=golden_noise,
        sampler=argmax,
        **render["params"],
    )
    assert np.array(tokens).tolist() == render["output_ids"]
    assert nfe == render["decoder_calls"]


def test_default_noise_and_sampler_draw_from_mlx():
    """Without hooks the canvas and the proposals come from MLX's generator:
    a seed repeats a run, another seed changes it, and no step is skipped."""
    model, _ = load()
    prompt = mx.array([CASES["cases"][0]["input_ids"][0][:12]])

    def sample(seed):
        mx.random.seed(seed)
        tokens, nfe = diffusion_generate(model, prompt, max_denoising_steps=6)
        return np.array(tokens).tolist(), nfe

    first, again, other = sample(0), sample(0), sample(1)
    assert first == again and first != other
    assert first[1] == 6


def test_settings_of_another_kind_are_refused():
    from mlx_lm import stream_generate

    model, tokenizer = load()
    with pytest.raises(ValueError, match="threshold do not apply to DiffusionGemma"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=8, threshold=0.9))
    llada, tokenizer = load_golden("tiny-mha")
    with pytest.raises(ValueError, match="entropy_bound do not apply to LLaDA"):
        list(stream_generate(llada, tokenizer, "hi", max_tokens=8, entropy_bound=1.0))
    with pytest.raises(ValueError, match="noise= is for uniform-noise models"):
        diffusion_generate(llada, mx.array([[1, 2]]), noise=golden_noise)
