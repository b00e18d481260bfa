"""Dream against the official reference's outputs (tests/fixtures/golden/dream).

The model's own logits (unshifted) within 1e-4; Dream's ``diffusion_generate``
token for token (single prompts, prompts with masks, left-padded batches);
Fast-dLLM's Dream loops (threshold, prefix and dual cache) token for token
with as many model calls or fewer; the demo's chat turns.

With ``MLX_LM_LLADA_UPSTREAM_TREE=1`` (and ``MLX_LM_LLADA_DISABLE=1``, and
an mlx-lm tree patched with ``patches/`` first on ``PYTHONPATH``) the same
cases run on the patched mlx-lm alone: tests/test_patches.py does that.
"""

import ast
import os

import mlx.core as mx
import numpy as np
import pytest
from conftest import case_id, forward_error, golden_cases, load_golden

if os.environ.get("MLX_LM_LLADA_UPSTREAM_TREE") == "1":
    from mlx_lm.diffusion import diffusion_generate
else:
    from mlx_lm_llada import diffusion_generate

FAMILY = "dream"
FORWARD = golden_cases("forward", FAMILY)
SAMPLER = [
    c
    for c in golden_cases(family=FAMILY)
    if c["kind"] in ("generate", "generate_infill", "generate_batch")
]
FASTDLLM = golden_cases("fastdllm.", FAMILY)
CHAT = golden_cases("chat", FAMILY)


def load(name):
    return load_golden(name, FAMILY)


@pytest.mark.parametrize("case", FORWARD, ids=case_id)
def test_forward_logits(case):
    assert forward_error(case, FAMILY) <= 1e-4


def generate(case):
    model, _ = load(case["model"])
    mask = case.get("attention_mask")
    return diffusion_generate(
        model,
        mx.array(case["prompt_ids"]),
        attention_mask=None if mask is None else mx.array(mask),
        **case["params"],
    )


@pytest.mark.parametrize("case", SAMPLER, ids=case_id)
def test_reference_sampler(case):
    tokens, nfe = generate(case)
    assert np.array(tokens).tolist() == case["output_ids"]
    assert nfe <= case["params"]["steps"]


def test_sampler_cases_cover_the_reference():
    assert len(SAMPLER) == 92
    algs = {c["params"]["alg"] for c in SAMPLER}
    assert algs == {"maskgit_plus", "topk_margin", "entropy"}
    # A step that commits nothing (the eps of the schedule) skips its call.
    case = next(
        c
        for c in SAMPLER
        if c["params"]["steps"] == c["params"]["max_new_tokens"] == 16
    )
    assert generate(case)[1] < 16


@pytest.mark.parametrize("case", FASTDLLM, ids=case_id)
def test_fastdllm(case):
    tokens, nfe = generate(case)
    assert np.array(tokens).tolist() == case["output_ids"]
    assert nfe <= case["nfe"]


@pytest.mark.parametrize("case", CHAT, ids=case_id)
def test_chat_turns(case):
    """Each turn's context is the chat template over the whole conversation
    (the answers as text), and the sampler's output on it is the demo's."""
    model, tokenizer = load(case["model"])
    turns = case["turns"]
    turns = ast.literal_eval(turns) if isinstance(turns, str) else turns
    assert len(turns) >= 2
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["user"]})
        context = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert context == turn["context_ids"][0]
        tokens, _ = diffusion_generate(
            model, mx.array(turn["context_ids"]), **case["params"]
        )
        assert np.array(tokens).tolist() == turn["output_ids"]
        answer = tokenizer.decode(turn["output_ids"][0][len(context) :])
        answer = answer.split(tokenizer.eos_token)[0].strip()
        assert answer == turn["answer_text"]
        messages.append({"role": "assistant", "content": answer})
