"""The model and the sampler against the official reference's outputs.

With ``MLX_LM_LLADA_UPSTREAM_TREE=1`` (and ``MLX_LM_LLADA_DISABLE=1``, and
an mlx-lm tree patched with ``patches/`` first on ``PYTHONPATH``) the same
cases run on the patched mlx-lm alone: tests/test_patches.py does that.
"""

import os

import mlx.core as mx
import numpy as np
import pytest
from conftest import GOLDEN, case_id, golden_cases, load_golden

if os.environ.get("MLX_LM_LLADA_UPSTREAM_TREE") == "1":
    from mlx_lm.diffusion import diffusion_generate
else:
    from mlx_lm_llada import diffusion_generate

FORWARD = golden_cases("forward")
SAMPLER = [c for c in golden_cases() if c["kind"] in ("generate", "generate_batch")]
FASTDLLM = golden_cases("fastdllm.")
CACHE_OF = {
    "fastdllm.generate": "none",
    "fastdllm.generate_with_prefix_cache": "prefix",
    "fastdllm.generate_with_dual_cache": "dual",
}


@pytest.mark.parametrize("case", FORWARD, ids=case_id)
def test_forward_logits(case):
    model, _ = load_golden(case["model"])
    mask = case.get("attention_mask")
    logits = model(
        mx.array(case["input_ids"]),
        attention_mask=None if mask is None else mx.array(mask),
    )
    expected = np.load(GOLDEN / case["logits"])
    assert logits.dtype == mx.float32
    assert np.abs(np.array(logits) - expected).max() <= 1e-4


@pytest.mark.parametrize("case", SAMPLER, ids=case_id)
def test_reference_sampler(case):
    model, _ = load_golden(case["model"])
    params = dict(case["params"])
    params.pop("attention_mask", None)
    mask = case.get("attention_mask")
    tokens, nfe = diffusion_generate(
        model,
        mx.array(case["prompt_ids"]),
        attention_mask=None if mask is None else mx.array(mask),
        **params,
    )
    assert np.array(tokens).tolist() == case["output_ids"]
    assert nfe <= params["steps"]


@pytest.mark.parametrize("case", FASTDLLM, ids=case_id)
def test_fastdllm(case):
    model, _ = load_golden(case["model"])
    tokens, nfe = diffusion_generate(
        model,
        mx.array(case["prompt_ids"]),
        cache=CACHE_OF[case["kind"]],
        **case["params"],
    )
    assert np.array(tokens).tolist() == case["output_ids"]
    assert nfe <= case["nfe"]
