"""Fill in the middle: a canvas from a template (gaps of masks between fixed
tokens) through the one loop, the Python API, and our generate command."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import (
    case_id,
    generated_text,
    golden_dir,
    load_golden,
    run_command,
)
from mlx_lm import stream_generate
from test_chat_terminal import make_autoregressive_model

from mlx_lm_llada import diffusion_generate, infill

with open(golden_dir("llada") / "infill_cases.json") as f:
    INFILL = json.load(f)["cases"]


@pytest.mark.parametrize("case", INFILL, ids=case_id)
def test_llada_infill_golden(case):
    """LLaDA's generate.py on a canvas pre-filled from the template."""
    model, _ = load_golden(case["model"])
    params = dict(case["params"])
    mask = params.pop("attention_mask", None)
    template = np.array(case["template_ids"])
    P = case["prompt_length"]
    tokens, nfe = diffusion_generate(
        model,
        mx.array(template[:, :P]),
        attention_mask=mx.ones((1, P), dtype=mx.int32) if mask else None,
        template=mx.array(template),
        **params,
    )
    assert np.array(tokens).tolist() == case["output_ids"]
    assert nfe <= case["nfe"]


def dream_reference(model, template, steps, eps=1e-3):
    """Dream's _sample (maskgit_plus, temperature 0) on a pre-filled canvas,
    written out here from its source: the whole canvas, the timestep
    schedule, shifted logits, top-k confidence."""
    x = np.array(template)
    ts = np.linspace(1, eps, steps + 1, dtype=np.float32)
    for i in range(steps):
        masked = x == MASK_DREAM
        if not masked.any():
            break
        logits = np.array(model(mx.array(x)), dtype=np.float64)
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        conf, x0 = p.max(-1), p.argmax(-1)
        n = int(masked.sum())
        k = n if i == steps - 1 else int(np.float32(n) * (1 - ts[i + 1] / ts[i]))
        conf = np.where(masked, conf, -np.inf)
        for pos in np.argsort(-conf[0], kind="stable")[:k]:
            x[0, pos] = x0[0, pos]
    return x


MASK_DREAM = 484


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-sharp"])
def test_dream_infill_is_dreams_loop_on_the_canvas(name):
    model, tokenizer = load_golden(name, "dream")
    prompt = tokenizer.encode("def mean(xs):\n")
    suffix = tokenizer.encode("\n    return total", add_special_tokens=False)
    template = [prompt + [MASK_DREAM] * 8 + suffix]
    tokens, nfe = diffusion_generate(
        model,
        mx.array([prompt]),
        template=mx.array(template),
        max_new_tokens=8 + len(suffix),
        steps=8,
        alg="maskgit_plus",
    )
    out = np.array(tokens)
    assert out.tolist() == dream_reference(model, template, 8).tolist()
    assert out[0, -len(suffix) :].tolist() == suffix
    assert nfe <= 8


@pytest.mark.parametrize(
    "family, name", [("llada", "tiny-sharp"), ("dream", "tiny-mha")]
)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_keep_fixed_tokens(family, name, cache):
    """With a cache and threshold decoding: fixed tokens stay, every gap is
    filled, and a block with no gap costs no call."""
    model, tokenizer = load_golden(name, family)
    prompt = tokenizer.encode("one two")
    mid = tokenizer.encode(" three four five six seven", add_special_tokens=False)
    mask = model.diffusion.mask_token_id
    tail = [mask] * 5 + mid + [mask] * 6
    steps = []
    tokens, nfe = diffusion_generate(
        model,
        mx.array([prompt]),
        template=mx.array([prompt + tail]),
        **(
            dict(gen_length=len(tail), block_length=4, threshold=0.9, cache=cache)
            if family == "llada"
            else dict(
                max_new_tokens=len(tail),
                block_length=4,
                alg="confidence_threshold",
                threshold=0.9,
                dual_cache=cache == "dual",
                steps=len(tail),
            )
        ),
        on_step=lambda st: steps.append(st),
    )
    out = np.array(tokens)[0, len(prompt) :]
    fixed = np.array(tail) != mask
    assert (out[fixed] == np.array(tail)[fixed]).all()
    assert (out != mask).all()
    committed = np.concatenate([np.concatenate(st.committed) for st in steps])
    assert not np.isin(committed - len(prompt), np.flatnonzero(fixed)).any()
    with_gaps = {
        b for b in range(-(-len(tail) // 4)) if mask in tail[4 * b : 4 * b + 4]
    }
    assert len(with_gaps) < -(-len(tail) // 4)  # some block is all fixed
    assert {st.block for st in steps} == with_gaps


def test_stream_yields_the_fill_alone():
    model, tokenizer = load_golden("tiny-sharp")
    prompt = tokenizer.encode("def mean(xs):\n")
    suffix = tokenizer.encode("\n    return total", add_special_tokens=False)
    steps = []
    responses = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=12,
            template=[12, suffix],
            block_length=8,
            reference=True,
            on_step=lambda st: steps.append(st.canvas[0].copy()),
        )
    )
    canvas = steps[-1]
    gap = canvas[len(prompt) : len(prompt) + 12].tolist()
    ends = [i for i, t in enumerate(gap) if t in model.diffusion.end_token_ids]
    expected = gap[: ends[0] + 1] if ends else gap
    assert [r.token for r in responses] == expected
    assert canvas[-len(suffix) :].tolist() == suffix


def test_a_gap_that_ends_early_is_end_padding():
    """tiny-eos proposes end tokens often: an earlier gap closed by one is
    skipped past, and the text holds no end token."""
    model, tokenizer = load_golden("tiny-eos")
    segments = ["hello", 6, " and ", 6, " done"]
    steps = []
    fills = infill.fill_segments(
        model,
        tokenizer,
        segments,
        reference=True,
        block_length=4,
        on_step=lambda st: steps.append(st.canvas[0].copy()),
    )
    assert len(fills) == 2
    ends = set(model.diffusion.end_token_ids)
    prompt, layout = infill.template(tokenizer, segments)
    canvas, pos = steps[-1], len(prompt)
    for fill, part in zip(fills, [p for p in layout if isinstance(p, int)]):
        gap = canvas[pos : pos + part].tolist()
        cut = next((i for i, t in enumerate(gap) if t in ends), len(gap))
        assert fill == tokenizer.decode(gap[:cut])
        pos += part + len(layout[layout.index(part) + 1])
    assert any(t in ends for t in steps[-1][len(prompt) :].tolist())


def test_python_api_fill_gaps_and_edit():
    model, tokenizer = mlx_lm.load("tests/fixtures/trained-sorter")
    prompt = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
    prompt += "sort 62265341<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    # The trained sorter fills the middle of a sorted answer.
    assert infill.fill(model, tokenizer, prompt + "12", "566", max_tokens=3) == "234"
    text = infill.fill_gaps(model, tokenizer, prompt + "12{{fill:3}}566")
    assert text == prompt + "12234566"
    # An edit rewrites a span (here a wrong one) and keeps the rest.
    assert infill.edit(model, tokenizer, prompt + "12999566", ["999"]) == (
        prompt + "12234566"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("a {{fill:x}} b", "Malformed gap"),
        ("a {{fill:0}} b", "at least one token"),
        ("a {{ fill }} b", "Malformed gap"),
        ("a {{fill b", "Malformed gap"),
    ],
)
def test_malformed_gaps_refused(text, message):
    with pytest.raises(ValueError, match=message):
        infill.parse_gaps(text, 8)


def test_gap_syntax_leaves_other_braces():
    assert infill.parse_gaps("f'{{x}}' {{fill:2}} {x}", 8) == ["f'{{x}}' ", 2, " {x}"]


@pytest.mark.parametrize(
    "template, message",
    [
        ([0, [1]], "positive"),
        ([[1, 2]], "no gap"),
        ([4, [482]], "mask token"),
        ([4, "text"], "gap length"),
    ],
)
def test_bad_templates_refused(template, message):
    model, tokenizer = load_golden("tiny-mha")
    with pytest.raises(ValueError, match=message):
        list(stream_generate(model, tokenizer, "hi", max_tokens=4, template=template))


def test_template_must_begin_with_the_prompt():
    model, _ = load_golden("tiny-mha")
    with pytest.raises(ValueError, match="begin with the prompt"):
        diffusion_generate(
            model,
            mx.array([[1, 2]]),
            template=mx.array([[1, 3, 482, 482]]),
            gen_length=2,
            steps=2,
            block_length=2,
        )


SORTER = "tests/fixtures/trained-sorter"
CHAT = (
    "<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\nsort 62265341"
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"
)


@pytest.mark.parametrize(
    "args",
    [
        ["--prompt", CHAT + "12", "--suffix", "566", "--max-tokens", "3"],
        ["--prompt", CHAT + "12{{fill:3}}566"],
    ],
    ids=["suffix", "gap"],
)
def test_generate_command_fills(args):
    out = run_command("mlx_lm_llada.generate", "--model", SORTER, *args)
    assert out.returncode == 0, out.stderr
    assert generated_text(out.stdout) == "234"


def test_generate_command_refuses_malformed_gap_and_causal_model(tmp_path):
    out = run_command(
        "mlx_lm_llada.generate", "--model", SORTER, "--prompt", "a {{fill:x}} b"
    )
    assert out.returncode != 0 and "Malformed gap" in out.stderr
    llama = make_autoregressive_model(tmp_path / "tiny-llama")
    args = ["--model", llama, "--max-tokens", "4", "--prompt", "a"]
    out = run_command("mlx_lm_llada.generate", *args, "--suffix", "b")
    assert out.returncode != 0 and "needs a diffusion model" in out.stderr
    # Without a gap the command generates as mlx-lm does.
    plain = run_command("mlx_lm_llada.generate", *args)
    assert plain.returncode == 0, plain.stderr
    assert generated_text(plain.stdout) == generated_text(
        run_command("mlx_lm.generate", *args).stdout
    )
