"""0002: the LLaDA model, the diffusion strategy, and their tests.

The two new modules are this package's own sources (``NEW_FILES``), with
their imports rewritten to upstream's relative style by make_series.py. The
edits are the diffusion-specific half of ``mlx_lm_llada/mlx_lm_patches.py``:
``patch_utils``'s ``generation_config.json`` defaults and
``patch_causal_only``'s refusals.
"""

SUBJECT = "Add LLaDA, a masked-diffusion model, and its sampler"

BODY = """\
mlx_lm/models/llada.py is the LLaDA model (the Hugging Face layout of
GSAI-ML/LLaDA-8B-Base and -Instruct, and LLaDA-1.5): a bidirectional
transformer, no causal mask. Its generate_step runs the masked-diffusion
strategy of mlx_lm/diffusion/ (settings, caches, commit rules, the loop,
the reference-shaped API, the generate_step adapter and the model base
that a diffusion model file inherits), which fills a canvas of mask
tokens block by block: LLaDA's reference schedule, Fast-dLLM's prefix
and dual caches, its threshold and factor rules for parallel decoding,
and early stop at an end token. The sampler reaches the model only
through model(...), model.layers and model.diffusion.

make_prompt_cache(model) gives a token cache (the conversation's tokens):
keys computed for one turn go stale when bidirectional attention sees the
next turn, so mlx_lm.chat and mlx_lm.server keep the context as tokens.

The settings can come from the checkpoint's generation_config.json
("diffusion"); perplexity, evaluate and lora refuse a diffusion model.
"""

# Our sources, as new upstream files: (upstream path, our path, the package
# whose relative imports they get, or None to copy as is).
NEW_FILES = [
    (
        "mlx_lm/diffusion/__init__.py",
        "mlx_lm_llada/diffusion/__init__.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/settings.py",
        "mlx_lm_llada/diffusion/settings.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/caches.py",
        "mlx_lm_llada/diffusion/caches.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/commit_rules.py",
        "mlx_lm_llada/diffusion/commit_rules.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/loop.py",
        "mlx_lm_llada/diffusion/loop.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/reference_api.py",
        "mlx_lm_llada/diffusion/reference_api.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/mlx_lm_adapter.py",
        "mlx_lm_llada/diffusion/mlx_lm_adapter.py",
        "mlx_lm.diffusion",
    ),
    (
        "mlx_lm/diffusion/model_base.py",
        "mlx_lm_llada/diffusion/model_base.py",
        "mlx_lm.diffusion",
    ),
    ("mlx_lm/models/llada.py", "mlx_lm_llada/models/llada.py", "mlx_lm.models"),
    ("tests/test_diffusion.py", "patches/src/test_diffusion.py", None),
]

GENERATION_CONFIG = (
    "mlx_lm/utils.py",
    "after",
    """\
        if eos_token_id := generation_config.get("eos_token_id", False):
            config["eos_token_id"] = eos_token_id
""",
    """\
        # A diffusion model's sampler settings (see mlx_lm/diffusion/settings.py).
        if "diffusion" in generation_config:
            config.setdefault("diffusion_defaults", generation_config["diffusion"])
""",
)

PERPLEXITY = (
    "mlx_lm/perplexity.py",
    "after",
    """\
    model, tokenizer = load(
        args.model,
        tokenizer_config=tokenizer_config,
        trust_remote_code=args.trust_remote_code,
    )
""",
    """\
    if getattr(model, "diffusion", None) is not None:
        raise ValueError("Perplexity needs a causal model, not a diffusion model.")
""",
)

LORA = (
    "mlx_lm/lora.py",
    "after",
    """\
    model, tokenizer = load(
        args.model,
        tokenizer_config={"trust_remote_code": args.trust_remote_code},
        trust_remote_code=args.trust_remote_code,
    )
""",
    """\
    if getattr(model, "diffusion", None) is not None:
        raise ValueError("LoRA training needs a causal model, not a diffusion model.")
""",
)

EVALUATE = (
    "mlx_lm/evaluate.py",
    "after",
    """\
        self._model, self.tokenizer = load(
            path_or_hf_repo,
            tokenizer_config=tokenizer_config,
            trust_remote_code=trust_remote_code,
        )
""",
    """\
        if getattr(self._model, "diffusion", None) is not None:
            raise ValueError("Evaluation needs a causal model, not a diffusion model.")
""",
)

TEST_MODELS = (
    "tests/test_models.py",
    "before",
    """\
    def test_lfm2(self):
""",
    """\
    def test_llada(self):
        from mlx_lm.models import llada

        args = llada.ModelArgs(
            model_type="llada",
            d_model=128,
            n_heads=4,
            n_kv_heads=2,
            n_layers=4,
            mlp_hidden_size=256,
            vocab_size=1000,
            mask_token_id=999,
        )
        model = llada.Model(args)
        self.model_test_runner(model, args.model_type, args.vocab_size, args.n_layers)

""",
)

EDITS = [GENERATION_CONFIG, PERPLEXITY, LORA, EVALUATE, TEST_MODELS]
