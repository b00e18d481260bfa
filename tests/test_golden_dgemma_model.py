"""DiffusionGemma's model against the reference's outputs
(tests/fixtures/golden/dgemma): the decoder's logits after encoding a prompt
(with and without self-conditioning, and after a committed canvas is
appended) within 1e-4; the reference's denoising traces replayed call for
call (left-padded batches, second canvases); loading; refusals.

The denoising loop is not tested here, only the calls it makes:
``encode(prompt)``, ``decode(canvas, self_conditioning=previous logits / t)``
per step, ``encode(committed canvas)`` before the next canvas.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import case_id, golden_cases, golden_dir, load_golden

FAMILY = "dgemma"
FORWARD = golden_cases("forward", FAMILY)
TRACED = [c for c in golden_cases("generate", FAMILY) if "trace" in c]
CASES = json.loads((golden_dir(FAMILY) / "cases.json").read_text())
SPECIAL = CASES["special_token_ids"]
TINY = golden_dir(FAMILY) / "tiny-a"


def load(name="tiny-a"):
    return load_golden(name, FAMILY)[0]


def npy(name):
    return np.load(golden_dir(FAMILY) / name)


def _error(logits, expected):
    assert logits.dtype == mx.float32 and logits.shape == expected.shape
    return np.abs(np.array(logits) - expected).max()


@pytest.mark.parametrize("case", FORWARD, ids=case_id)
def test_forward_logits(case):
    """Encode the prompt at 0..P-1 (and the appended canvas after it), then
    decode the canvas at the positions the reference gives it."""
    model = load(case["model"])
    cache = model.make_encoder_cache()
    model.encode(mx.array(case["input_ids"]), cache)
    if case["kind"] == "forward_append":
        assert case["appended_position_ids"][0] == cache[0].offset
        model.encode(mx.array(case["appended_canvas"]), cache)
    assert case["decoder_position_ids"][0] == cache[0].offset
    canvas = mx.array(case["decoder_input_ids"])
    sc = (
        mx.array(npy(case["self_conditioning_logits"]))
        if "selfcond" in case["kind"]
        else None
    )
    logits = model.decode(canvas, cache, self_conditioning=sc)
    assert _error(logits, npy(case["logits"])) <= 1e-4
    if case["kind"] == "forward_append":
        sc = mx.array(npy(case["self_conditioning_logits"]))
        logits = model.decode(canvas, cache, self_conditioning=sc)
        assert _error(logits, npy(case["logits_selfcond"])) <= 1e-4


@pytest.mark.parametrize("case", TRACED, ids=lambda c: f"{c['model']}-{c['label']}")
def test_reference_trace_replayed(case):
    """Every decoder call of a traced reference run, on the reference's
    canvases: the same argmax canvas and mean entropy for every row still
    denoising. The self-conditioning input is the previous call's logits
    over its temperature (a finished row keeps its own); a new canvas first
    encodes the last argmax canvas, the attention mask grown by its length."""
    model = load(case["model"])
    cache = model.make_encoder_cache()
    mask = case.get("attention_mask")
    mask = None if mask is None else mx.array(mask)
    model.encode(mx.array(case["prompt_ids"]), cache, attention_mask=mask)
    sc = committed = None
    previous_step = None
    for step in case["trace"]:
        canvas = mx.array(step["canvas_in"])
        B, C = canvas.shape
        if previous_step is not None and step["cur_step"] > previous_step:
            if mask is not None:
                mask = mx.concatenate([mask, mx.ones((B, C), mask.dtype)], axis=1)
            model.encode(mx.array(committed), cache, attention_mask=mask)
            sc = None
        previous_step = step["cur_step"]
        offset = cache[0].offset
        z = model.decode(canvas, cache, self_conditioning=sc, attention_mask=mask)
        assert cache[0].offset == offset  # read only
        z = z / step["temperature"]
        p = mx.softmax(z, axis=-1)
        entropy = -(p * mx.log(mx.maximum(p, 1e-30))).sum(-1).mean(-1)
        done = np.array(step["finished_before"])
        argmax = np.array(z.argmax(-1))
        for b in np.flatnonzero(~done):
            assert argmax[b].tolist() == step["argmax"][b]
            assert abs(entropy[b].item() - step["mean_entropy"][b]) < 2e-4
        sc = z if sc is None else mx.where(mx.array(done)[:, None, None], sc, z)
        committed = [committed[b] if done[b] else step["argmax"][b] for b in range(B)]


def test_decode_reads_the_cache_and_keeps_it():
    model = load()
    cache = model.make_encoder_cache()
    prompt = mx.array([[2] + list(range(200, 220))])  # longer than the window
    model.encode(prompt, cache)
    before = [mx.array(c._temporal_order(c.keys)) for c in cache[:2]]
    offsets = [c.offset for c in cache]
    canvas = mx.array([list(range(300, 308))])
    first = model.decode(canvas, cache)
    assert [c.offset for c in cache] == offsets
    for b, c in zip(before, cache[:2]):
        assert mx.array_equal(b, c._temporal_order(c.keys))
    assert mx.array_equal(first, model.decode(canvas, cache))


def test_padding_columns_are_not_read():
    """A left-padded row's logits do not depend on its pad tokens (positions
    are not shifted per row), in the encoder nor the decoder."""
    model = load()
    tokens = [2, 267, 139, 115, 191, 300, 301, 302, 303, 304]
    mask = mx.array([[0] * 4 + [1] * len(tokens)] * 2)
    prompts = mx.array([[0] * 4 + tokens, [7, 8, 9, 10] + tokens])
    cache = model.make_encoder_cache()
    model.encode(prompts, cache, attention_mask=mask)
    canvas = mx.array([list(range(400, 408))] * 2)
    logits = model.decode(canvas, cache, attention_mask=mask)
    assert mx.allclose(logits[0], logits[1], atol=1e-5)
    # The mask may also cover the canvas.
    full = mx.concatenate([mask, mx.ones((2, 8), mask.dtype)], axis=1)
    assert mx.allclose(logits, model.decode(canvas, cache, attention_mask=full))


# Loading ---------------------------------------------------------------------


def test_load():
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from mlx_lm_llada.models import diffusion_gemma

    model, tokenizer = mlx_lm.load(str(TINY))
    assert isinstance(model, diffusion_gemma.Model)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not any("vision" in k or "lm_head" in k for k in names)
    # Both passes' scalars are loaded, and they differ.
    layer = model.layers[0]
    assert layer.encoder_scalar.item() != layer.decoder_scalar.item() != 1.0
    # Full layers: K = V (no v_proj), their own head width and kv heads.
    full = model.layers[2].self_attn
    assert not full.is_sliding and "v_proj" not in full
    assert (full.head_dim, full.n_kv_heads) == (32, 1)
    assert model.layers[0].self_attn.head_dim == 16
    assert [type(c) for c in model.make_encoder_cache()] == [
        RotatingKVCache,
        RotatingKVCache,
        KVCache,
    ]
    assert model.make_encoder_cache()[0].max_size == model.args.sliding_window == 8
    assert model.args.canvas_length == 8
    assert tokenizer.convert_tokens_to_ids("<mask>") == SPECIAL["<mask>"]


def test_sanitize_drops_the_vision_tower():
    from safetensors.numpy import load_file

    model = load()
    raw = load_file(str(TINY / "model.safetensors"))
    assert any(k.startswith("model.encoder.vision_tower.") for k in raw)
    weights = model.sanitize({k: mx.array(v) for k, v in raw.items()})
    assert not any("vision" in k for k in weights)
    assert "model.layers.0.experts.switch_glu.gate_proj.weight" in weights
    assert "model.layers.1.encoder_scalar" in weights
    # Sanitized weights go through again unchanged (mlx_lm.convert's output).
    assert model.sanitize(dict(weights)).keys() == weights.keys()


def test_quantized_embedding_self_conditions():
    """With a quantized embedding the soft embedding is a quantized matmul
    of the same table; a quantized model runs both passes."""
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    model, _ = load_model(TINY)
    nn.quantize(
        model,
        group_size=32,
        bits=8,
        class_predicate=lambda _, m: hasattr(m, "to_quantized")
        and m.weight.shape[-1] % 32 == 0,
    )
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding)
    logits = mx.random.normal((1, 8, 512), key=mx.random.key(0)) * 3
    table = mx.dequantize(
        embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits
    )
    expected = mx.softmax(logits, axis=-1) @ table * 8.0  # sqrt(64)
    soft = model.model.soft_embedding(logits)
    assert mx.allclose(soft, expected, atol=1e-4)

    cache = model.make_encoder_cache()
    model.encode(mx.array([[2] + list(range(10, 22))]), cache)
    z = model.decode(mx.array([list(range(30, 38))]), cache, self_conditioning=logits)
    assert z.dtype == mx.float32 and mx.isfinite(z).all()


def test_quant_predicate_keeps_the_router_at_8_bits():
    predicate = load().quant_predicate
    assert predicate("model.layers.0.router.proj", None) == {
        "group_size": 64,
        "bits": 8,
    }
    assert predicate("model.layers.0.mlp.gate_proj", None) is True


# Refusals ----------------------------------------------------------------------


def _tiny_copy(tmp_path, text=None, **outer):
    path = tmp_path / "tiny-a"
    shutil.copytree(TINY, path)
    config = json.loads((path / "config.json").read_text())
    config.update(outer)
    config["text_config"].update(text or {})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "text, outer, match",
    [
        (dict(use_bidirectional_attention="all"), {}, "use_bidirectional_attention"),
        (dict(hidden_activation="silu"), {}, "hidden_activation"),
        (dict(attention_bias=True), {}, "attention_bias"),
        ({}, dict(tie_word_embeddings=False), "tie_word_embeddings"),
        (dict(num_experts=None), {}, "num_experts"),
        (dict(per_layer_config={"0": {"head_dim": 32}}), {}, "per_layer_config"),
    ],
)
def test_unsupported_config_is_refused_by_name(tmp_path, text, outer, match):
    import mlx_lm

    with pytest.raises(ValueError, match=f"DiffusionGemma config.*{match}"):
        mlx_lm.load(str(_tiny_copy(tmp_path, text, **outer)))


def test_image_input_is_refused():
    model = load()
    image = SPECIAL["<|image|>"]
    with pytest.raises(ValueError, match="text only.*image token"):
        model.encode(mx.array([[2, image, 10]]), model.make_encoder_cache())


def test_wrong_cache_or_mask_is_refused():
    model = load()
    with pytest.raises(ValueError, match="one cache per layer"):
        model.encode(mx.array([[2, 10]]), model.make_encoder_cache()[:1])
    cache = model.make_encoder_cache()
    with pytest.raises(ValueError, match="covers 3 positions, not 2"):
        model.encode(mx.array([[2, 10]]), cache, attention_mask=mx.ones((1, 3)))
    model.encode(mx.array([[2, 10]]), cache)
    with pytest.raises(ValueError, match="covers 5 positions, not 2 or 10"):
        model.decode(mx.array([[5] * 8]), cache, attention_mask=mx.ones((1, 5)))
