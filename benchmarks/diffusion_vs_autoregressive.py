"""Diffusion decoding modes against mlx-lm's autoregressive decoding, one run.

For one model geometry (a LLaDA, Dream or LLaDA 2 shape) it measures, on
this machine and in this process:

- the reference schedule (one full pass per step), Fast-dLLM's prefix cache,
  dual cache, and dual cache with threshold 0.9: tokens per second, model
  calls per token and peak memory;
- the cost of one step of each kind (full pass, prefix step, dual step)
  against the full pass;
- mlx-lm's own autoregressive decoding (``generate_step``) of the model it
  descends from (a llama for LLaDA, a Qwen2 for Dream, mlx-lm's
  ``bailing_moe`` for LLaDA 2) of the same width, depth, vocabulary and
  dtype, generating as many tokens.

For LLaDA 2 (block-causal) the modes are its reference (every step
recomputes the prompt and every finished block) and the exact cache of
finished blocks; each row also gives the tokens a model call processes.

Run it with OpenBLAS preloaded on Linux (see benchmarks/README.md).
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lm_llada import diffusion_generate

# The canvas in each family's diffusion_generate arguments: n tokens in
# blocks of b, one step per token.
CANVAS = {
    "LLaDA": lambda n, b: dict(steps=n, gen_length=n, block_length=b),
    "Dream": lambda n, b: dict(steps=n, max_new_tokens=n, block_length=b),
    # LLaDA 2: steps per block; its threshold 0.95 with the scheduled floor.
    "LLaDA2": lambda n, b: dict(steps=b, gen_length=n, block_length=b),
    # DiffusionGemma: canvases of b, its generation defaults.
    "DiffusionGemma": lambda n, b: dict(max_new_tokens=n, canvas_length=b),
}

# Each decoding mode in the family's diffusion_generate arguments.
MODES = {
    "LLaDA": {
        "reference": dict(cache="none"),
        "prefix cache": dict(cache="prefix"),
        "dual cache": dict(cache="dual"),
        "dual cache + threshold 0.9": dict(cache="dual", threshold=0.9),
        # Approximations of ours: calls see 32 positions past the block; the
        # dual cache recomputes the block from its first mask.
        "dual cache + threshold 0.9 + suffix 32": dict(
            cache="dual", threshold=0.9, suffix_length=32
        ),
        "dual cache + threshold 0.9 + suffix 32 + tail window": dict(
            cache="dual", threshold=0.9, suffix_length=32, dual_window="tail"
        ),
    },
    # Dream's own loop has no blocks: the whole canvas at once, on the
    # timestep schedule (entropy ranking, as Dream's examples). Fast-dLLM's
    # Dream loops decode it in blocks, with a prefix or a dual cache.
    "Dream": {
        "reference": dict(alg="entropy", block_length=None),
        "prefix cache": dict(alg="entropy"),
        "dual cache": dict(alg="entropy", dual_cache=True),
        "dual cache + threshold 0.9": dict(
            alg="confidence_threshold", threshold=0.9, dual_cache=True
        ),
    },
    "LLaDA2": {
        "reference": dict(cache="none"),
        "block cache (exact)": dict(cache="prefix"),
    },
    # One loop, the reference's: up to 48 decoder calls a canvas.
    "DiffusionGemma": {"reference": dict()},
}


def generate(model, prompt, gen_length, block_length, mode, **kwargs):
    """``diffusion_generate`` in ``mode``, in the model family's arguments."""
    family = model.diffusion.family
    params = {**CANVAS[family](gen_length, block_length), **MODES[family][mode]}
    return diffusion_generate(model, prompt, **params, **kwargs)


def llada_model(g, dtype, bits):
    from mlx_lm_llada.models import llada

    args = llada.ModelArgs(
        model_type="llada",
        d_model=g["d_model"],
        n_heads=g["n_heads"],
        n_layers=g["n_layers"],
        mlp_hidden_size=g["mlp_hidden_size"],
        vocab_size=g["vocab"],
        mask_token_id=g["vocab"] - 128,
        eos_token_id=g["vocab"] - 127,
        rope_theta=500000.0,
    )
    return _finish(llada.Model(args), dtype, bits)


def llama_model(g, dtype, bits):
    from mlx_lm.models import llama

    return _hf_model(llama, g, dtype, bits, rms_norm_eps=1e-5, rope_theta=500000.0)


def qwen2_model(g, dtype, bits):
    from mlx_lm.models import qwen2

    return _hf_model(qwen2, g, dtype, bits, rms_norm_eps=1e-6, rope_theta=1e6)


def dream_model(g, dtype, bits):
    from mlx_lm_llada.models import dream

    return _hf_model(
        dream,
        g,
        dtype,
        bits,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        mask_token_id=g["vocab"] - 128,
        eos_token_id=g["vocab"] - 127,
    )


def _bailing_args(g):
    # Ling-2.0's router: 8 groups, 4 kept, top-8 of the experts, a shared one.
    return dict(
        model_type="bailing_moe",
        hidden_size=g["d_model"],
        intermediate_size=g["mlp_hidden_size"],
        max_position_embeddings=32768,
        moe_intermediate_size=g["expert_hidden_size"],
        num_experts=g["experts"],
        num_shared_experts=1,
        norm_topk_prob=True,
        num_attention_heads=g["n_heads"],
        num_experts_per_tok=8,
        num_hidden_layers=g["n_layers"],
        num_key_value_heads=g["n_kv_heads"],
        rms_norm_eps=1e-6,
        rope_theta=600000.0,
        vocab_size=g["vocab"],
        first_k_dense_replace=1,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        moe_router_enable_expert_bias=True,
        routed_scaling_factor=2.5,
        score_function="sigmoid",
        n_group=8,
        topk_group=4,
    )


def bailing_model(g, dtype, bits):
    from mlx_lm.models import bailing_moe

    return _finish(
        bailing_moe.Model(bailing_moe.ModelArgs(**_bailing_args(g))), dtype, bits
    )


def llada2_model(g, dtype, bits):
    from mlx_lm_llada.models import llada2_moe

    args = {**_bailing_args(g), "model_type": "llada2_moe"}
    ids = dict(mask_token_id=g["vocab"] - 128, eos_token_id=g["vocab"] - 127)
    return _finish(llada2_moe.Model(llada2_moe.ModelArgs(**args, **ids)), dtype, bits)


def _gemma_config(g):
    """A DiffusionGemma config.json (text_config nested) of the shape ``g``:
    four sliding layers to a full one, K = V and wider heads on full ones."""
    layers = ["sliding_attention"] * 4 + ["full_attention"]
    layers = (layers * g["n_layers"])[: g["n_layers"]]
    full = {
        str(i): {"head_dim": 2 * g["head_dim"], "num_key_value_heads": 1}
        for i, t in enumerate(layers)
        if t == "full_attention"
    }
    text = dict(
        model_type="diffusion_gemma_text",
        hidden_size=g["d_model"],
        num_hidden_layers=g["n_layers"],
        intermediate_size=g["mlp_hidden_size"],
        num_attention_heads=g["n_heads"],
        num_key_value_heads=g["n_kv_heads"],
        head_dim=g["head_dim"],
        per_layer_config=full,
        layer_types=layers,
        vocab_size=g["vocab"],
        sliding_window=g["window"],
        num_experts=g["experts"],
        top_k_experts=8,
        moe_intermediate_size=g["expert_hidden_size"],
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        eos_token_id=[1, 106],
        pad_token_id=0,
        bos_token_id=2,
        rope_parameters={
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    )
    return dict(
        model_type="diffusion_gemma",
        text_config=text,
        canvas_length=256,
        tie_word_embeddings=True,
    )


def diffusion_gemma_model(g, dtype, bits):
    from mlx_lm_llada.models import diffusion_gemma

    args = diffusion_gemma.ModelArgs.from_dict(_gemma_config(g))
    return _finish(diffusion_gemma.Model(args), dtype, bits)


def gemma4_model(g, dtype, bits):
    """mlx-lm's causal gemma4_text of the same layers."""
    from dataclasses import fields

    from mlx_lm.models import gemma4_text

    from mlx_lm_llada.models import diffusion_gemma

    same = diffusion_gemma.ModelArgs.from_dict(_gemma_config(g))
    args = {f.name: getattr(same, f.name) for f in fields(gemma4_text.ModelArgs)}
    args["model_type"] = "gemma4_text"
    return _finish(gemma4_text.Model(gemma4_text.ModelArgs(**args)), dtype, bits)


def _hf_model(module, g, dtype, bits, **args):
    """``module``'s Model (Hugging Face argument names) of the shape ``g``."""
    args = module.ModelArgs(
        model_type=module.__name__.rsplit(".", 1)[-1],
        hidden_size=g["d_model"],
        num_hidden_layers=g["n_layers"],
        intermediate_size=g["mlp_hidden_size"],
        num_attention_heads=g["n_heads"],
        num_key_value_heads=g.get("n_kv_heads", g["n_heads"]),
        vocab_size=g["vocab"],
        tie_word_embeddings=False,
        **args,
    )
    return _finish(module.Model(args), dtype, bits)


def _finish(model, dtype, bits):
    model.set_dtype(dtype)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


# A family: its diffusion model, its autoregressive baseline (the model it
# descends from) and its token embedding; each of them built from a shape.
LLADA = dict(
    model=llada_model,
    autoregressive=llama_model,
    embedding=lambda model: model.model.transformer.wte,
)
DREAM = dict(
    model=dream_model,
    autoregressive=qwen2_model,
    embedding=lambda model: model.model.embed_tokens,
)
LLADA2 = dict(model=llada2_model, autoregressive=bailing_model, embedding=None)
DIFFUSION_GEMMA = dict(
    model=diffusion_gemma_model, autoregressive=gemma4_model, embedding=None
)


def shape(
    d_model,
    n_layers,
    n_heads,
    mlp_hidden_size,
    vocab,
    n_kv_heads=None,
    experts=None,
    expert_hidden_size=None,
    head_dim=None,
    window=None,
):
    """A geometry's shape, in these names (``n_kv_heads`` None: one per head)."""
    given = dict(locals())
    return {k: v for k, v in given.items() if v is not None}


GEOMETRIES = {
    # LLaDA-8B's shape (4096 wide, 32 layers) scaled to a 2-core CPU, with the
    # full 126,464-row vocabulary.
    "llada-8b-scaled": dict(LLADA, shape=shape(1024, 8, 8, 3072, 126464)),
    # Dream-7B's (Qwen2.5-7B's: 3584 wide, 28 layers, 28 heads of 128, 4 KV
    # heads, MLP 18944) scaled the same way, by 4 but for the full 152,064-row
    # vocabulary; q/k/v biases, as Qwen2.
    "dream-7b-scaled": dict(DREAM, shape=shape(896, 7, 7, 4736, 152064, n_kv_heads=1)),
    # LLaDA2.0-mini's (Ling-mini-2.0: 2048 wide, 20 layers, 16 heads of 128,
    # 4 KV heads, 256 experts of 512, top-8) scaled to a 2-core CPU: 4 times
    # narrower, 6 layers, 64 experts, with the full 157,184-row vocabulary.
    "llada2-mini-scaled": dict(
        LLADA2,
        shape=shape(
            512, 6, 8, 1280, 157184, n_kv_heads=2, experts=64, expert_hidden_size=128
        ),
    ),
    # DiffusionGemma-26B-A4B's kind of shape (Gemma 4 MoE: sliding and full
    # layers 4:1, K = V full layers, 8 experts of many per token, the
    # 262,144-row vocabulary) scaled to a 2-core CPU.
    "diffusion-gemma-scaled": dict(
        DIFFUSION_GEMMA,
        shape=shape(
            512,
            5,
            8,
            1024,
            262144,
            n_kv_heads=2,
            experts=32,
            expert_hidden_size=256,
            head_dim=64,
            window=512,
        ),
    ),
    "tiny": dict(LLADA, shape=shape(64, 2, 4, 160, 512)),
    "tiny-dream": dict(DREAM, shape=shape(64, 2, 4, 160, 512, n_kv_heads=2)),
    "tiny-gemma": dict(
        DIFFUSION_GEMMA,
        shape=shape(
            64,
            5,
            4,
            128,
            512,
            n_kv_heads=2,
            experts=8,
            expert_hidden_size=32,
            head_dim=16,
            window=16,
        ),
    ),
    "tiny-llada2": dict(
        LLADA2,
        shape=shape(
            64, 2, 4, 128, 512, n_kv_heads=2, experts=16, expert_hidden_size=32
        ),
    ),
}


def _peak_reset():
    mx.synchronize()
    mx.reset_peak_memory()


def tokens_before_end(canvas, prompt_length, end_ids):
    gen = np.array(canvas)[0, prompt_length:]
    ends = np.flatnonzero(np.isin(gen, list(end_ids)))
    return int(ends[0]) if len(ends) else len(gen)


def run_diffusion(model, prompt, gen_length, block_length, mode, blocks, early_stop):
    """Decode until ``blocks`` blocks' worth of canvas tokens are committed (a
    block loop: the first ``blocks`` blocks; Dream's reference, one block the
    size of the canvas: its first commits, wherever they are); tokens counted
    before the end."""
    P = prompt.shape[1]
    calls = []
    tokens_in = []
    committed = []

    class Stop(Exception):
        pass

    def on_step(step):
        calls.append(step.nfe)
        tokens_in.append(step.tokens_in)
        if uniform:  # drafts until a canvas is committed
            committed.append(step.final_end - P)
        else:
            committed.append(int((step.canvas[0, P:] != mask_id).sum()))
        if committed[-1] >= blocks * block_length:
            raise Stop

    mask_id = model.diffusion.mask_token_id
    uniform = model.diffusion.noise == "uniform"
    _peak_reset()
    tic = time.perf_counter()
    canvas = None
    try:
        canvas, nfe = generate(
            model,
            prompt,
            gen_length,
            block_length,
            mode,
            early_stop=early_stop,
            on_step=on_step,
        )
    except Stop:
        nfe = calls[-1]
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory() / 1e9
    tokens = committed[-1]
    if canvas is not None:
        tokens = tokens_before_end(canvas, P, model.diffusion.end_token_ids)
    return dict(
        mode=mode,
        tokens=tokens,
        nfe=nfe,
        seconds=seconds,
        tokens_per_second=tokens / seconds,
        calls_per_token=nfe / max(tokens, 1),
        tokens_per_call=float(np.mean(tokens_in)),
        peak_gb=peak,
    )


def run_autoregressive(model, prompt, n_tokens):
    from mlx_lm.generate import generate_step

    _peak_reset()
    tic = time.perf_counter()
    first = None
    for n, _ in enumerate(generate_step(prompt[0], model, max_tokens=n_tokens)):
        if n == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    return dict(
        mode="autoregressive (mlx-lm)",
        tokens=n_tokens,
        nfe=n_tokens,
        seconds=end - tic,
        tokens_per_second=n_tokens / (end - tic),
        decode_tokens_per_second=(n_tokens - 1) / (end - first),
        calls_per_token=1.0,
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def time_call(fn, repeat=3):
    fn()
    best = math.inf
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def step_costs(model, ar_model, embedding, prompt, gen_length, block_length, repeat=3):
    """Seconds for one call of each kind, at the first block of the canvas."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_llada.diffusion import CanvasCache

    mask_id = model.diffusion.mask_token_id
    P = prompt.shape[1]
    x = mx.concatenate([prompt, mx.full((1, gen_length), mask_id, prompt.dtype)], 1)
    T = x.shape[1]
    block = mx.arange(block_length)
    caches = [CanvasCache() for _ in model.layers]
    mx.eval(model(x, cache=caches, logits_positions=P + block))

    def full():
        mx.eval(model(x, logits_positions=P + block))

    def prefix():
        for c in caches:
            c.offset = P
        mx.eval(model(x[:, P:], cache=caches, logits_positions=block))

    def dual():
        for c in caches:
            c.offset = P
        out = model(x[:, P : P + block_length], cache=caches, logits_positions=block)
        mx.eval(out)

    def dual_no_head():
        for c in caches:
            c.offset = P
        h = embedding(model)(x[:, P : P + block_length])
        for b, c in zip(model.layers, caches):
            h = b(h, None, c)
        mx.eval(h)

    ar_cache = make_prompt_cache(ar_model)
    mx.eval(ar_model(prompt[:, :-1], cache=ar_cache))

    def ar_step():
        for c in ar_cache:
            c.trim(c.offset - (P - 1))
        mx.eval(ar_model(prompt[:, -1:], cache=ar_cache))

    costs = {
        "full pass": time_call(full, repeat),
        "prefix step": time_call(prefix, repeat),
        "dual step": time_call(dual, repeat),
        "dual step, no output head": time_call(dual_no_head, repeat),
        "autoregressive step": time_call(ar_step, repeat),
    }
    costs["dual / full"] = costs["dual step"] / costs["full pass"]
    costs["canvas tokens"] = T
    return costs


def checkpoint_geometry(model):
    a = model.args
    return dict(
        d_model=a.d_model,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        mlp_hidden_size=a.mlp_hidden_size,
        vocab=a.embedding_size,
    )


def run_trained(path, problems, gen_length, block_length, dtype, modes=None):
    """Each decoding mode on held-out problems, one at a time, early stop on
    (as mlx-lm streams): answer tokens per second, calls, exact match."""
    import mlx_lm

    sys.path.insert(0, str(Path(__file__).parent))
    from train_tiny_llada import heldout_problems, make_task, parse_answer

    model, tokenizer = mlx_lm.load(str(path))
    model.set_dtype(dtype)
    info = json.loads((Path(path) / "training.json").read_text())
    targs = info["args"]
    task = make_task(
        targs.get("task", "add"),
        max_digits=targs.get("max_digits", 3),
        min_len=targs.get("min_len", 6),
        max_len=targs.get("max_len", 8),
    )
    questions = heldout_problems(task, n=problems, seed=targs.get("heldout_seed", 1234))
    end_ids = model.diffusion.end_token_ids
    prompts = [
        mx.array(
            [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True
                )
            ]
        )
        for q in questions
    ]
    rows = []
    for mode in modes or MODES[model.diffusion.family]:
        for early_stop in (True, False):
            tokens = calls = correct = 0
            _peak_reset()
            tic = time.perf_counter()
            for q, prompt in zip(questions, prompts):
                canvas, nfe = generate(
                    model, prompt, gen_length, block_length, mode, early_stop=early_stop
                )
                P = prompt.shape[1]
                n = tokens_before_end(canvas, P, end_ids)
                text = tokenizer.decode(np.array(canvas)[0, P : P + n].tolist())
                correct += parse_answer(text) == task.answer(q)
                tokens += n
                calls += nfe
            seconds = time.perf_counter() - tic
            rows.append(
                dict(
                    mode=mode + (" + early stop" if early_stop else ""),
                    tokens=tokens,
                    nfe=calls,
                    seconds=seconds,
                    tokens_per_second=tokens / seconds,
                    calls_per_token=calls / max(tokens, 1),
                    peak_gb=mx.get_peak_memory() / 1e9,
                    exact_match=correct / len(questions),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    # mlx-lm's autoregressive decoding of a llama of the same shape, as many
    # answer tokens per problem, from prompts of the same lengths.
    g = checkpoint_geometry(model)
    llama = llama_model(g, dtype, 0)
    per_problem = max(1, rows[0]["tokens"] // len(questions))
    _peak_reset()
    tic = time.perf_counter()
    for prompt in prompts:
        for _ in generate_step_tokens(llama, prompt, per_problem):
            pass
    seconds = time.perf_counter() - tic
    n = per_problem * len(prompts)
    rows.append(
        dict(
            mode="autoregressive (mlx-lm)",
            tokens=n,
            nfe=n,
            seconds=seconds,
            tokens_per_second=n / seconds,
            calls_per_token=1.0,
            peak_gb=mx.get_peak_memory() / 1e9,
        )
    )
    print(json.dumps(rows[-1]), flush=True)
    return g, rows


def run_early_stop(path, gen_length, block_length, prompt_text="hello"):
    """A short answer in a long canvas, with and without early stop."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    prompt = mx.array(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt_text}], add_generation_prompt=True
            )
        ]
    )
    rows = []
    for early_stop in (False, True):
        for mode in MODES[model.diffusion.family]:
            tic = time.perf_counter()
            canvas, nfe = generate(
                model, prompt, gen_length, block_length, mode, early_stop=early_stop
            )
            seconds = time.perf_counter() - tic
            n = tokens_before_end(
                canvas, prompt.shape[1], model.diffusion.end_token_ids
            )
            rows.append(
                dict(
                    mode=mode + (" + early stop" if early_stop else ", whole canvas"),
                    answer_tokens=n,
                    nfe=nfe,
                    seconds=seconds,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def generate_step_tokens(model, prompt, n):
    from mlx_lm.generate import generate_step

    return generate_step(prompt[0], model, max_tokens=n)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 3.3 * len(results)))
    axes = np.atleast_1d(axes)
    for ax, result in zip(axes, results):
        rows = result["rows"]
        names = [r["mode"] for r in rows]
        tps = [r["tokens_per_second"] for r in rows]
        colors = ["#888" if "autoregressive" in n else "#2a7" for n in names]
        ax.barh(names, tps, color=colors)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_yaxis()
        ax.set_xlabel("generated tokens per second (log)")
        ax.set_title(result["title"], fontsize=10)
        for y, v in enumerate(tps):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        default="llada-8b-scaled",
        help="a random-weight shape; it names the family (LLaDA or Dream)",
    )
    parser.add_argument(
        "--model", type=Path, help="a trained checkpoint instead of a geometry"
    )
    parser.add_argument("--problems", type=int, default=20, help="with --model")
    parser.add_argument(
        "--early-stop",
        action="store_true",
        help="with --model: a short answer in the canvas, early stop on and off",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--bits", type=int, default=0, help="quantize (4 or 8)")
    parser.add_argument("--prompt-length", type=int, default=300)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument(
        "--blocks",
        type=int,
        default=1,
        help="blocks of the canvas to decode per mode (each block costs alike; "
        "a loop without blocks, as Dream's reference: as many tokens)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=sorted({m for modes in MODES.values() for m in modes}),
        help="only these decoding modes (default: all)",
    )
    parser.add_argument(
        "--step-costs-only",
        action="store_true",
        help="a geometry's one-call costs only, not its decoding modes (for "
        "4-bit on a CPU, where a full pass takes minutes)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed calls per step cost (best)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-results.json"))
    parser.add_argument(
        "--plot",
        nargs="+",
        type=Path,
        help="only draw results JSON files into --out (a .png)",
    )
    args = parser.parse_args()

    if args.plot:
        results = [json.loads(p.read_text()) for p in args.plot]
        plot(results, args.out)
        return

    mx.random.seed(0)
    load_start = os.getloadavg()
    dtype = getattr(mx, args.dtype)
    if args.model is not None and args.early_stop:
        rows = run_early_stop(args.model, args.gen_length, args.block_length)
        args.out.write_text(json.dumps(dict(early_stop=rows), indent=2))
        return
    if args.model is not None:
        g, rows = run_trained(
            args.model,
            args.problems,
            args.gen_length,
            args.block_length,
            dtype,
            args.modes,
        )
        costs = None
        title = f"trained {args.model.name}, {args.dtype}, canvas {args.gen_length}"
    else:
        geometry = GEOMETRIES[args.geometry]
        g = geometry["shape"]
        model = geometry["model"](g, dtype, args.bits)
        ar_model = geometry["autoregressive"](g, dtype, args.bits)
        prompt = mx.random.randint(0, g["vocab"] - 256, (1, args.prompt_length))
        rows = []
        modes = args.modes or MODES[model.diffusion.family]
        for mode in [] if args.step_costs_only else modes:
            rows.append(
                run_diffusion(
                    model,
                    prompt,
                    args.gen_length,
                    args.block_length,
                    mode,
                    args.blocks,
                    early_stop=False,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        if rows:
            rows.append(run_autoregressive(ar_model, prompt, rows[0]["tokens"]))
            print(json.dumps(rows[-1]), flush=True)
        costs = None
        if geometry["embedding"] is not None:
            costs = step_costs(
                model,
                ar_model,
                geometry["embedding"],
                prompt,
                args.gen_length,
                args.block_length,
                args.repeat,
            )
            print(json.dumps(costs), flush=True)
        bits = f"{args.bits}-bit" if args.bits else args.dtype
        title = f"{args.geometry} (random weights), {bits}, canvas {args.gen_length}"

    result = dict(
        title=title,
        shape=g,
        dtype=args.dtype,
        bits=args.bits,
        gen_length=args.gen_length,
        block_length=args.block_length,
        machine=platform.platform(),
        device=str(mx.default_device()),
        rows=rows,
        step_costs=costs,
        # 1-, 5- and 15-minute load averages (os.getloadavg) when the run
        # started and ended: other work on the machine slows every number.
        load_average=dict(start=load_start, end=os.getloadavg()),
    )
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
