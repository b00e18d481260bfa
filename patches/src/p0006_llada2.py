"""0006: the LLaDA 2.x model, on mlx-lm's bailing_moe layers, and its tests.

The new module is this package's ``mlx_lm_llada/models/llada2_moe.py``
(``NEW_FILES``), its imports made relative by make_series.py. The
checkpoints' ``model_type`` is ``llada2_moe``, the module's file name, so
``_get_classes`` finds it without a ``MODEL_REMAPPING`` entry. The
block-causal attention, the cache of finished blocks and LLaDA 2.0/2.1's
decoding (scheduled threshold floor, token editing) are already in 0002's
mlx_lm/diffusion/; the model declares ``attention="block_causal"`` to it.
"""

SUBJECT = "Add LLaDA 2, a block-diffusion model on bailing_moe layers"

BODY = """\
mlx_lm/models/llada2_moe.py is LLaDA 2.0 and 2.1 (the Hugging Face layout
of inclusionAI/LLaDA2.0-* and LLaDA2.1-*, model_type "llada2_moe"): the
layers and tensor names of mlx_lm/models/bailing_moe.py, with
block-causal attention (a position sees its own block of block_length
tokens and every block before it), which it declares to the sampler of
mlx_lm/diffusion/.

Its router subclasses bailing_moe's gate: the reference sets the scores
of the expert groups it drops to -inf, bailing_moe's group_expert_select
sets them to 0, which a negative biased score of a kept group's expert
can lose to (then an expert of a dropped group is chosen).

Its generate_step decodes as LLaDA 2.0's generate() does (blocks of 32,
32 steps a block, threshold 0.95 with the scheduled floor), with the
finished blocks in a KV cache (exact under block-causal attention);
reference=True recomputes the prefix at each step, as generate() does.
diffusion_generate takes generate()'s arguments (gen_length,
block_length, steps, threshold, ...) and LLaDA 2.1's token editing
(editing_threshold, max_post_steps, num_to_transfer).

config.json has no mask, start or end-of-turn id; the module's
CONFIG_TOKENS takes them from the tokenizer, and TOKENIZER_DEFAULTS adds
<|role_end|>, the end of a chat answer, to the EOS tokens.
"""

# (upstream path, our path, the package whose relative imports it gets).
NEW_FILES = [
    (
        "mlx_lm/models/llada2_moe.py",
        "mlx_lm_llada/models/llada2_moe.py",
        "mlx_lm.models",
    ),
]

TEST_MODELS = (
    "tests/test_models.py",
    "before",
    """\
    def test_lfm2(self):
""",
    """\
    @unittest.skipIf(
        not mx.metal.is_available(),
        "The token cache evaluates the call: float16 gather_mm needs Metal",
    )
    def test_llada2_moe(self):
        from mlx_lm.models import llada2_moe

        args = llada2_moe.ModelArgs(
            model_type="llada2_moe",
            hidden_size=128,
            intermediate_size=256,
            max_position_embeddings=1000,
            moe_intermediate_size=64,
            num_experts=8,
            num_shared_experts=1,
            norm_topk_prob=True,
            num_attention_heads=4,
            num_experts_per_tok=2,
            num_hidden_layers=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=600000,
            vocab_size=1000,
            first_k_dense_replace=1,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
            score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            n_group=4,
            topk_group=2,
            mask_token_id=999,
        )
        model = llada2_moe.Model(args)
        self.model_test_runner(
            model, args.model_type, args.vocab_size, args.num_hidden_layers
        )

""",
)

TEST_DIFFUSION_IMPORT = (
    "tests/test_diffusion.py",
    "replace",
    """\
from mlx_lm.models import dream, llada, llada_moe
""",
    """\
from mlx_lm.models import dream, llada, llada2_moe, llada_moe
""",
)

TEST_DIFFUSION = (
    "tests/test_diffusion.py",
    "before",
    """\


if __name__ == "__main__":
""",
    """\


class TestLLaDA2(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        mx.random.seed(0)
        args = llada2_moe.ModelArgs(
            model_type="llada2_moe",
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=256,
            moe_intermediate_size=16,
            num_experts=8,
            num_shared_experts=1,
            norm_topk_prob=True,
            num_attention_heads=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=600000,
            vocab_size=64,
            first_k_dense_replace=1,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
            score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            routed_scaling_factor=2.5,
            n_group=4,
            topk_group=2,
            mask_token_id=MASK,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
        cls.model = llada2_moe.Model(args)
        mx.eval(cls.model.parameters())
        cls.prompt = mx.array([[BOS, 1, 2, 3, 4]])

    def test_model_type_is_the_module(self):
        from mlx_lm.utils import _get_classes

        model_class, _ = _get_classes({"model_type": "llada2_moe"})
        self.assertIs(model_class, llada2_moe.Model)

    def test_block_causal_attention(self):
        # A block's logits do not depend on the blocks after it.
        x = mx.array([[BOS, 1, 2, 3, 4, 5, 6, 7] + [MASK] * 8])
        y = mx.array([[BOS, 1, 2, 3, 4, 5, 6, 7] + [9] * 8])
        a, b = self.model(x, block_length=8), self.model(y, block_length=8)
        alone = self.model(x[:, :8], block_length=8)
        self.assertTrue(mx.allclose(a[:, :8], b[:, :8], atol=1e-5))
        self.assertTrue(mx.allclose(a[:, :8], alone, atol=1e-5))
        self.assertFalse(mx.allclose(a[:, 8:], b[:, 8:], atol=1e-5))

    def stream(self, **kwargs):
        return [t for t, _ in generate_step(self.prompt[0], self.model, **kwargs)]

    def reference(self, **kwargs):
        # What the stream yields: the new tokens up to the first EOS.
        tokens, nfe = diffusion_generate(self.model, self.prompt, **kwargs)
        tokens = np.array(tokens)
        self.assertFalse((tokens == MASK).any())
        new = tokens[0, 5:].tolist()
        return new[: new.index(EOS) + 1] if EOS in new else new, nfe

    def test_llada2_generate(self):
        # LLaDA 2.0's generate() arguments; the stream keeps the finished
        # blocks in a KV cache (cache="prefix", the model's default).
        kwargs = dict(block_length=8, steps=8, threshold=0.95)
        tokens, nfe = self.reference(gen_length=16, **kwargs)
        # Blocks aligned to position 0: the prompt ends in the first of 3.
        self.assertLessEqual(nfe, 3 * 8)
        self.assertEqual(self.stream(max_tokens=16, **kwargs), tokens)
        reference = self.stream(max_tokens=16, reference=True, **kwargs)
        self.assertEqual(reference, tokens)

    def test_llada21_editing(self):
        # LLaDA 2.1's token editing: a committed token may be replaced.
        kwargs = dict(
            block_length=8, threshold=0.8, editing_threshold=0.5, num_to_transfer=2
        )
        tokens, _ = self.reference(gen_length=16, **kwargs)
        self.assertEqual(self.stream(max_tokens=16, **kwargs), tokens)
""",
)

EDITS = [TEST_MODELS, TEST_DIFFUSION_IMPORT, TEST_DIFFUSION]
