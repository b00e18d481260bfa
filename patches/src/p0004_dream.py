"""0004: the Dream model, on mlx-lm's Qwen2 layers, and its tests.

The new module is this package's ``mlx_lm_llada/models/dream.py``
(``NEW_FILES``), its imports made relative by make_series.py. Dream's
checkpoints spell their ``model_type`` ``Dream``: ``MODEL_REMAPPING`` maps it
to the module, as our import hook does (``registration_hook.MODEL_MODULES``).
The strategy (Dream's timestep schedule, its ``alg`` names, Fast-dLLM's Dream
loops) is already in 0002's mlx_lm/diffusion/.
"""

SUBJECT = "Add Dream, a masked-diffusion model on Qwen2 layers"

BODY = """\
mlx_lm/models/dream.py is Dream (the Hugging Face layout of
Dream-org/Dream-v0-Base-7B and -Instruct-7B, apple/DiffuCoder-7B-* and
Dream-org/Dream-Coder-v0-*-7B): Qwen2's layers and tensor names from
mlx_lm/models/qwen2.py, with attention over the whole sequence. Its
logits are shifted (the token at position i is read from the logits at
position i - 1), which it declares to the sampler of mlx_lm/diffusion/.

Its generate_step decodes as Fast-dLLM does for Dream (blocks of 32, dual
cache, threshold 0.9); reference=True gives Dream's own diffusion_generate
(the whole canvas, the timestep schedule). diffusion_generate takes
Dream's own arguments (max_new_tokens, steps, eps, alg, alg_temp, ...,
and Fast-dLLM's threshold, block_length, dual_cache).

The checkpoints' model_type is "Dream"; MODEL_REMAPPING maps it to the
module. The end-of-turn token <|im_end|>, which config.json lacks, comes
from the tokenizer (CONFIG_TOKENS, TOKENIZER_DEFAULTS).
"""

# (upstream path, our path, the package whose relative imports it gets).
NEW_FILES = [
    ("mlx_lm/models/dream.py", "mlx_lm_llada/models/dream.py", "mlx_lm.models"),
]

REMAPPING = (
    "mlx_lm/utils.py",
    "after",
    """\
    "deepseek_v41_text": "deepseek_v41",
""",
    """\
    "Dream": "dream",
""",
)

TEST_MODELS = (
    "tests/test_models.py",
    "before",
    """\
    def test_qwen(self):
""",
    """\
    def test_dream(self):
        from mlx_lm.models import dream

        args = dream.ModelArgs(
            model_type="Dream",
            hidden_size=128,
            num_hidden_layers=4,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            vocab_size=1000,
            mask_token_id=999,
        )
        model = dream.Model(args)
        self.model_test_runner(
            model, args.model_type, args.vocab_size, args.num_hidden_layers
        )

""",
)

TEST_DIFFUSION_IMPORT = (
    "tests/test_diffusion.py",
    "replace",
    """\
from mlx_lm.models import llada
""",
    """\
from mlx_lm.models import dream, llada
""",
)

TEST_DIFFUSION = (
    "tests/test_diffusion.py",
    "before",
    """\


if __name__ == "__main__":
""",
    """\


def tiny_dream(**kwargs):
    mx.random.seed(0)
    args = dream.ModelArgs(
        model_type="Dream",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=64,
        mask_token_id=MASK,
        **kwargs,
    )
    model = dream.Model(args)
    mx.eval(model.parameters())
    return model


class TestDream(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_dream()
        cls.prompt = mx.array([[1, 2, 3, 4, 5]])

    def test_model_type_is_remapped(self):
        from mlx_lm.utils import _get_classes

        model_class, _ = _get_classes({"model_type": "Dream"})
        self.assertIs(model_class, dream.Model)

    def test_logits_are_shifted(self):
        # One new token is read from the last prompt position's logits.
        logits = self.model(mx.array([[1, 2, 3, 4, 5, MASK]]))
        tokens, nfe = diffusion_generate(
            self.model, self.prompt, max_new_tokens=1, steps=1, alg="maskgit_plus"
        )
        self.assertEqual(nfe, 1)
        self.assertEqual(np.array(tokens)[0, 5], mx.argmax(logits[0, 4]).item())

    def test_reference_algs(self):
        # Dream's schedule commits nothing at its first step for 16 masks in
        # 16 steps (the eps of the timesteps): that call is skipped.
        for alg in ("maskgit_plus", "topk_margin", "entropy"):
            tokens, nfe = diffusion_generate(
                self.model, self.prompt, max_new_tokens=16, steps=16, alg=alg
            )
            tokens = np.array(tokens)
            self.assertEqual(tokens.shape, (1, 21))
            self.assertEqual(tokens[0, :5].tolist(), [1, 2, 3, 4, 5])
            self.assertFalse((tokens == MASK).any())
            self.assertLess(nfe, 16)

    def test_block_caches(self):
        # Fast-dLLM's Dream loops: each block starts with a full pass; then
        # the prefix cache runs the block and what follows, the dual cache
        # the block alone. 8 steps: 4 calls a block; threshold 0: 2.
        T, P = 5 + 16, 5
        expected = {
            False: [T] + [T - P] * 3 + [T] + [T - P - 8] * 3,
            True: [T, 8, 8, 8] * 2,
        }
        for dual_cache, lengths in expected.items():
            for alg, threshold in (("entropy", None), ("confidence_threshold", 0)):
                model = Recorder(self.model)
                tokens, nfe = diffusion_generate(
                    model,
                    self.prompt,
                    max_new_tokens=16,
                    steps=8,
                    alg=alg,
                    threshold=threshold,
                    block_length=8,
                    dual_cache=dual_cache,
                )
                if threshold is not None:
                    lengths = lengths[:2] + lengths[4:6]
                self.assertEqual(model.lengths, lengths)
                self.assertEqual(nfe, len(lengths))
                self.assertFalse((np.array(tokens) == MASK).any())

    def test_batch_with_padding(self):
        # A left-padded row counts its positions from its first token.
        prompt = mx.array([[0, 0, 1, 2, 3], [5, 4, 3, 2, 1]])
        mask = mx.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        kwargs = dict(max_new_tokens=8, steps=8, alg="entropy")
        batch, _ = diffusion_generate(self.model, prompt, attention_mask=mask, **kwargs)
        alone, _ = diffusion_generate(self.model, prompt[:1, 2:], **kwargs)
        self.assertEqual(np.array(batch)[0, 2:].tolist(), np.array(alone)[0].tolist())

    def test_generate_step(self):
        # reference=True: Dream's own loop, through mlx-lm's generate_step.
        tokens, _ = diffusion_generate(
            self.model, self.prompt, max_new_tokens=12, steps=12, alg="maskgit_plus"
        )
        stream = generate_step(
            self.prompt[0], self.model, max_tokens=12, steps=12, reference=True
        )
        self.assertEqual([t for t, _ in stream], np.array(tokens)[0, 5:].tolist())
""",
)

EDITS = [REMAPPING, TEST_MODELS, TEST_DIFFUSION_IMPORT, TEST_DIFFUSION]
