"""0005: the LLaDA-MoE model, on mlx-lm's Qwen3-MoE layers, and its tests.

The new module is this package's ``mlx_lm_llada/models/llada_moe.py``
(``NEW_FILES``), its imports made relative by make_series.py. LLaDA-MoE's
checkpoints say ``model_type: "llada"``, as LLaDA-8B's do (0002's
``mlx_lm/models/llada.py``); their ``architectures`` tell them apart:
``MODEL_ARCHITECTURE_REMAPPING`` maps ``("llada", "LLaDAMoEModelLM")`` to the
module, as our import hook does (``registration_hook.MODEL_ARCHITECTURES``).
The mask, start and end-of-turn ids come from the tokenizer through the
module's ``CONFIG_TOKENS`` (0001's generic code); the sampler is 0002's.
"""

SUBJECT = "Add LLaDA-MoE, a masked-diffusion model on Qwen3-MoE layers"

BODY = """\
mlx_lm/models/llada_moe.py is LLaDA-MoE (the Hugging Face layout of
inclusionAI/LLaDA-MoE-7B-A1B-Base and -Instruct): the layers of
mlx_lm/models/qwen3_moe.py (query and key RMS norms, a softmax router,
the experts in one SwitchGLU) with attention over the whole sequence,
and LLaDA's sampler from mlx_lm/diffusion/ (reference=True gives LLaDA's
generate.py). sanitize stacks the per-expert Linears of a Hugging Face
checkpoint into the SwitchGLU.

The checkpoints' model_type is "llada", as LLaDA-8B's is; their
architectures entry, "LLaDAMoEModelLM", tells them apart:
MODEL_ARCHITECTURE_REMAPPING maps ("llada", "LLaDAMoEModelLM") to the
module. config.json has no mask, start or end-of-turn id; the module's
CONFIG_TOKENS takes them from the tokenizer, and TOKENIZER_DEFAULTS adds
<|role_end|>, the end of an Instruct answer, to the EOS tokens.
"""

# (upstream path, our path, the package whose relative imports it gets).
NEW_FILES = [
    (
        "mlx_lm/models/llada_moe.py",
        "mlx_lm_llada/models/llada_moe.py",
        "mlx_lm.models",
    ),
]

ARCHITECTURE_REMAPPING = (
    "mlx_lm/utils.py",
    "after",
    """\
    ("bailing_hybrid", "BailingMoeV3ForCausalLM"): "bailing_moe_v3",
""",
    """\
    ("llada", "LLaDAMoEModelLM"): "llada_moe",
""",
)

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
    def test_llada_moe(self):
        from mlx_lm.models import llada_moe

        args = llada_moe.ModelArgs(
            model_type="llada",
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            expert_intermediate_size=64,
            vocab_size=1000,
            mask_token_id=999,
        )
        model = llada_moe.Model(args)
        self.model_test_runner(
            model, args.model_type, args.vocab_size, args.num_hidden_layers
        )

""",
)

TEST_DIFFUSION_IMPORT = (
    "tests/test_diffusion.py",
    "replace",
    """\
from mlx_lm.models import dream, llada
""",
    """\
from mlx_lm.models import dream, llada, llada_moe
""",
)

TEST_DIFFUSION = (
    "tests/test_diffusion.py",
    "before",
    """\


if __name__ == "__main__":
""",
    """\


class TestLLaDAMoE(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        mx.random.seed(0)
        args = llada_moe.ModelArgs(
            model_type="llada",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            expert_intermediate_size=16,
            vocab_size=64,
            mask_token_id=MASK,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
        cls.model = llada_moe.Model(args)
        mx.eval(cls.model.parameters())
        cls.prompt = mx.array([[BOS, 1, 2, 3, 4]])

    def test_architecture_picks_the_moe_model(self):
        # Both say model_type "llada"; the architecture tells them apart.
        from mlx_lm.utils import _get_classes

        config = {"model_type": "llada", "architectures": ["LLaDAMoEModelLM"]}
        self.assertIs(_get_classes(config)[0], llada_moe.Model)
        config = {"model_type": "llada", "architectures": ["LLaDAModelLM"]}
        self.assertIs(_get_classes(config)[0], llada.Model)

    def test_reference_generate(self):
        tokens, nfe = diffusion_generate(
            self.model, self.prompt, steps=8, gen_length=16, block_length=8
        )
        tokens = np.array(tokens)
        self.assertEqual(tokens.shape, (1, 21))
        self.assertEqual(tokens[0, :5].tolist(), self.prompt[0].tolist())
        self.assertFalse((tokens == MASK).any())
        self.assertEqual(nfe, 8)
""",
)

EDITS = [ARCHITECTURE_REMAPPING, TEST_MODELS, TEST_DIFFUSION_IMPORT, TEST_DIFFUSION]
