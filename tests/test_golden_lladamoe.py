"""LLaDA-MoE against the official reference's outputs
(tests/fixtures/golden/lladamoe).

The logits within 1e-4 (padded rows at their tokens only); LLaDA's
``diffusion_generate`` with the reference's arguments token for token, in as
many model calls or fewer; the checkpoint loads as the MoE model although its
``model_type`` is LLaDA-8B's; mlx-lm's own commands run it, quantized too.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import (
    GOLDEN,
    case_id,
    forward_error,
    generated_text,
    golden_cases,
    golden_dir,
    load_golden,
    run_command,
)

from mlx_lm_llada import diffusion_generate

FAMILY = "lladamoe"
FORWARD = golden_cases("lladamoe.forward", FAMILY)
SAMPLER = golden_cases("lladamoe.generate", FAMILY)
TINY = golden_dir(FAMILY) / "lladamoe-tiny"
SPECIAL = json.loads((golden_dir(FAMILY) / "cases.json").read_text())[
    "special_token_ids"
]
MAX_TOKENS = 16


def load(name):
    return load_golden(name, FAMILY)


@pytest.mark.parametrize("case", FORWARD, ids=case_id)
def test_forward_logits(case):
    assert forward_error(case, FAMILY) <= 1e-4


@pytest.mark.parametrize("case", SAMPLER, ids=case_id)
def test_reference_sampler(case):
    model, _ = load(case["model"])
    tokens, nfe = diffusion_generate(
        model, mx.array(case["prompt_ids"]), **case["params"]
    )
    assert np.array(tokens).tolist() == case["output_ids"]
    assert nfe <= case["nfe"]


# Loading ----------------------------------------------------------------------


def test_load_dispatches_on_architecture():
    import mlx_lm

    from mlx_lm_llada.models import llada, llada_moe

    model, _ = mlx_lm.load(str(TINY))
    assert isinstance(model, llada_moe.Model)
    assert model.model_type == "llada"
    # The mask id is the tokenizer's; the end of a turn too.
    spec = model.diffusion
    assert spec.mask_token_id == SPECIAL["<|mask|>"]
    assert spec.eos_token_id == SPECIAL["<|endoftext|>"]
    assert spec.eot_token_id == SPECIAL["<|role_end|>"]
    mlp = model.layers[0].mlp
    assert mlp.switch_mlp.gate_proj.weight.shape == (8, 32, 64)
    assert mlp.top_k == 2 and not mlp.norm_topk_prob

    # A plain LLaDA checkpoint (the same model_type) is the dense model.
    dense, _ = mlx_lm.load(str(GOLDEN / "tiny-mha"))
    assert type(dense) is llada.Model


def _tiny_copy(tmp_path, **changes):
    path = tmp_path / "lladamoe-tiny"
    shutil.copytree(TINY, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "key, value",
    [
        ("routed_scaling_factor", 2.5),
        ("shared_expert_intermediate_size", 64),
        ("moe_router_score_function", "sigmoid"),
        ("moe_router_enable_expert_bias", True),
        ("router_num_group", 4),
        ("partial_rotary_factor", 0.5),
    ],
)
def test_unsupported_config_is_refused_by_name(tmp_path, key, value):
    import mlx_lm

    with pytest.raises(ValueError, match=f"LLaDA-MoE config {key}="):
        mlx_lm.load(str(_tiny_copy(tmp_path, **{key: value})))


# mlx-lm's commands -----------------------------------------------------------


def _in_process(model, tokenizer, prompt="hello"):
    from mlx_lm import stream_generate

    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=MAX_TOKENS))
    return "".join(r.text for r in responses), len(responses)


def test_generate_command():
    args = ["--model", TINY, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args)
    assert out.returncode == 0, out.stderr
    text, n = _in_process(*load("lladamoe-tiny"))
    assert n > 0
    assert generated_text(out.stdout) == text
    assert f"Generation: {n} tokens" in out.stdout


def test_convert_4bit_then_generate(tmp_path):
    import mlx_lm

    converted = tmp_path / "lladamoe-tiny-4bit"
    out = run_command(
        "mlx_lm.convert", "--hf-path", TINY, "--mlx-path", converted, "-q"
    )
    assert out.returncode == 0, out.stderr

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llada"
    assert config["architectures"] == ["LLaDAMoEModelLM"]
    assert config["mask_token_id"] == SPECIAL["<|mask|>"]
    quantization = config["quantization"]
    assert quantization["bits"] == 4
    # The router stays at 8 bits (as in mlx-lm's Qwen3-MoE).
    assert quantization["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}

    quantized, tokenizer = mlx_lm.load(str(converted))
    mlp = quantized.layers[0].mlp
    assert isinstance(mlp.gate, nn.QuantizedLinear) and mlp.gate.bits == 8
    assert mlp.switch_mlp.gate_proj.bits == 4
    attention = quantized.layers[0].self_attn
    assert isinstance(attention.q_proj, nn.QuantizedLinear)
    assert attention.q_proj.bits == 4

    args = ["--model", converted, "--prompt", "hello", "--max-tokens", MAX_TOKENS]
    out = run_command("mlx_lm.generate", *args)
    assert out.returncode == 0, out.stderr
    text, n = _in_process(quantized, tokenizer)
    assert generated_text(out.stdout) == text
    assert f"Generation: {n} tokens" in out.stdout

    # The 4-bit logits follow the float ones.
    model, _ = load("lladamoe-tiny")
    x = mx.random.randint(0, 486, (2, 24), key=mx.random.key(0))
    ref, logits = model(x), quantized(x)
    assert logits.shape == ref.shape and mx.all(mx.isfinite(logits)).item()
    cos = (mx.sum(logits * ref) / mx.sqrt(mx.sum(logits**2) * mx.sum(ref**2))).item()
    assert cos > 0.9, cos
