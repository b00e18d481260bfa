"""0007: the DiffusionGemma model, on mlx-lm's Gemma 4 layers, and its tests.

The new module is this package's ``mlx_lm_llada/models/diffusion_gemma.py``
(``NEW_FILES``), its imports made relative by make_series.py. The
checkpoints' ``model_type`` is ``diffusion_gemma``, the module's file name,
so ``_get_classes`` finds it without a ``MODEL_REMAPPING`` entry. The
uniform-noise loop (``denoise_uniform``), the encoder cache and the
reference call's noise and sampler hooks are already in 0002's
mlx_lm/diffusion/; the model declares ``noise="uniform"`` to it.

No ``model_test_runner`` test: the model has no single-pass ``__call__``
(an encoder pass writes a causal cache, a decoder pass reads it), which the
runner calls; tests/test_models.py gets a load-path test instead (the nested
config and the Hugging Face names, as upstream's gemma4 tests do).
"""

SUBJECT = "Add DiffusionGemma, a uniform-noise diffusion model on Gemma 4 layers"

BODY = """\
mlx_lm/models/diffusion_gemma.py is DiffusionGemma (the Hugging Face
layout of google/diffusiongemma-26B-A4B-it, model_type
"diffusion_gemma", the text stack under text_config): the layers and
tensor names of mlx_lm/models/gemma4_text.py (sliding and full
attention, K = V on full layers, the experts beside a dense MLP), run
in two passes over the same weights, each with its own per-layer
scalar. encode is causal over the prompt and then over each committed
canvas, and appends their keys and values to mlx-lm's KV caches
(rotating ones on sliding layers); decode is bidirectional over a
canvas placed after the cache, reads the cache and never writes it, and
adds a self-conditioning signal (the previous step's distribution) to
its input. Text only: sanitize drops the vision tower's weights, and a
prompt with the image token is refused.

Unlike LLaDA's masks, a canvas starts as uniform noise and every
position is proposed again at each step (an entropy bound decides which
proposals are kept, the rest is noised again); a canvas is read out
when its argmax is stable and confident. The model declares
noise="uniform" to the sampler of mlx_lm/diffusion/, whose
denoise_uniform runs that loop canvas by canvas. Its generate_step
streams each canvas once it is read out; diffusion_generate takes the
reference generate()'s arguments (max_new_tokens, max_denoising_steps,
entropy_bound, t_min, t_max, stability_threshold,
confidence_threshold) and a noise hook. make_prompt_cache(model) keeps
the conversation's tokens and the encoder's cache, so a chat's next
turn encodes only what is new.

config.json's text_config has the end tokens ([<eos>, <turn|>]);
TOKENIZER_DEFAULTS adds <turn|>, the end of a chat answer, to the EOS
tokens.
"""

# (upstream path, our path, the package whose relative imports it gets).
NEW_FILES = [
    (
        "mlx_lm/models/diffusion_gemma.py",
        "mlx_lm_llada/models/diffusion_gemma.py",
        "mlx_lm.models",
    ),
]

TEST_MODELS = (
    "tests/test_models.py",
    "before",
    """\
    def test_gemma4_convert_then_load_keeps_language_model_prefix(self):
""",
    """\
    def test_diffusion_gemma(self):
        # No model_test_runner: the model has no single-pass __call__ (an
        # encoder pass writes a causal cache, a decoder pass reads it).
        from mlx_lm.models import diffusion_gemma

        args = diffusion_gemma.ModelArgs.from_dict(
            {
                "model_type": "diffusion_gemma",
                "canvas_length": 4,
                "tie_word_embeddings": True,
                "text_config": {
                    "model_type": "diffusion_gemma_text",
                    "hidden_size": 16,
                    "num_hidden_layers": 2,
                    "intermediate_size": 32,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "head_dim": 8,
                    "vocab_size": 32,
                    "sliding_window": 4,
                    "num_experts": 2,
                    "top_k_experts": 1,
                    "moe_intermediate_size": 8,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "per_layer_config": {
                        "1": {"head_dim": 16, "num_key_value_heads": 1}
                    },
                },
            }
        )
        self.assertEqual(args.global_head_dim, 16)
        self.assertEqual(args.canvas_length, 4)
        model = diffusion_gemma.Model(args)
        self.assertEqual(model.model_type, "diffusion_gemma")

        # The Hugging Face names: one text stack under model.decoder, the
        # encoder's layer scalars apart, no lm_head (tied), a vision tower.
        hf = {}
        for k, v in tree_flatten(model.parameters()):
            if k.endswith(".encoder_scalar"):
                k = k.replace("model.", "model.encoder.language_model.", 1)
                hf[k.replace("encoder_scalar", "layer_scalar")] = v
                continue
            k = k.replace("model.", "model.decoder.", 1)
            hf[k.replace("decoder_scalar", "layer_scalar")] = v
        hf["model.encoder.vision_tower.stub"] = mx.zeros((1,))
        hf["model.encoder.embed_vision.stub"] = mx.zeros((1,))
        sanitized = model.sanitize(hf)
        self.assertFalse(any("vision" in k for k in sanitized))
        model.load_weights(list(sanitized.items()), strict=True)

        cache = model.make_encoder_cache()
        model.encode(mx.array([[0, 1, 2, 3, 4, 5]]), cache)
        logits = model.decode(mx.array([[6, 7, 8, 9]]), cache)
        self.assertEqual(logits.shape, (1, 4, args.vocab_size))
        self.assertEqual(cache[0].offset, 6)

""",
)

TEST_DIFFUSION_IMPORT = (
    "tests/test_diffusion.py",
    "replace",
    """\
from mlx_lm.models import dream, llada, llada2_moe, llada_moe
""",
    """\
from mlx_lm.models import diffusion_gemma, dream, llada, llada2_moe, llada_moe
""",
)

TEST_DIFFUSION = (
    "tests/test_diffusion.py",
    "before",
    """\


if __name__ == "__main__":
""",
    """\


def fixed_noise(k, shape):
    # The k-th draw of canvas tokens, a fixed function of k, row and position.
    B, C = shape
    b, j = np.arange(B)[:, None], np.arange(C)[None]
    return mx.array((1000003 * k + 7919 * b + 104729 * j + 12345) % 64)


def argmax(logprobs):
    return mx.argmax(logprobs, axis=-1)


class DecoderCalls:
    # Wraps a DiffusionGemma model: counts its decoder calls.

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def decode(self, *args, **kwargs):
        self.calls += 1
        return self.model.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class TestDiffusionGemma(unittest.TestCase):
    C = 4  # the canvas length

    @classmethod
    def setUpClass(cls):
        mx.random.seed(0)
        args = diffusion_gemma.ModelArgs.from_dict(
            {
                "model_type": "diffusion_gemma",
                "canvas_length": cls.C,
                "text_config": {
                    "hidden_size": 32,
                    "num_hidden_layers": 3,
                    "intermediate_size": 32,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "head_dim": 8,
                    "vocab_size": 64,
                    "sliding_window": 4,
                    "num_experts": 4,
                    "top_k_experts": 2,
                    "moe_intermediate_size": 8,
                    "layer_types": ["sliding_attention"] * 2 + ["full_attention"],
                    "per_layer_config": {
                        "2": {"head_dim": 16, "num_key_value_heads": 1}
                    },
                    "bos_token_id": BOS,
                },
            }
        )
        cls.model = diffusion_gemma.Model(args)
        mx.eval(cls.model.parameters())
        cls.prompt = mx.array([[BOS, 1, 2, 3, 4, 5]])

    def test_model_type_is_the_module(self):
        from mlx_lm.utils import _get_classes

        model_class, _ = _get_classes({"model_type": "diffusion_gemma"})
        self.assertIs(model_class, diffusion_gemma.Model)
        spec = self.model.diffusion
        self.assertEqual(spec.noise, "uniform")
        self.assertIsNone(spec.mask_token_id)
        self.assertEqual(spec.defaults["block_length"], self.C)

    def test_decoder_never_writes_the_encoder_cache(self):
        cache = self.model.make_encoder_cache()
        self.model.encode(self.prompt, cache)
        before = [(c.offset, np.array(c.keys), np.array(c.values)) for c in cache]
        canvas = mx.array([[7, 8, 9, 10]])
        first = self.model.decode(canvas, cache)
        mx.eval(self.model.decode(canvas, cache, self_conditioning=first))
        again = self.model.decode(canvas, cache)
        for c, (offset, keys, values) in zip(cache, before):
            self.assertEqual(c.offset, offset)
            self.assertTrue(np.array_equal(np.array(c.keys), keys))
            self.assertTrue(np.array_equal(np.array(c.values), values))
        self.assertTrue(mx.allclose(first, again, atol=1e-5))

    def test_second_canvas_sits_after_the_first(self):
        # The committed first canvas is encoded after the prompt, at the
        # positions it had as a canvas: as if encoded with the prompt.
        first, second = mx.array([[7, 8, 9, 10]]), mx.array([[11, 12, 13, 14]])
        appended = self.model.make_encoder_cache()
        self.model.encode(self.prompt, appended)
        self.model.encode(first, appended)
        whole = self.model.make_encoder_cache()
        self.model.encode(mx.concatenate([self.prompt, first], axis=1), whole)
        P = self.prompt.shape[1]
        self.assertEqual(appended[0].offset, P + self.C)
        a = self.model.decode(second, appended)
        b = self.model.decode(second, whole)
        self.assertTrue(mx.allclose(a, b, atol=1e-4))
        # And the loop lays canvas c at P + c * C.
        starts = []
        diffusion_generate(
            self.model,
            self.prompt,
            noise=fixed_noise,
            sampler=argmax,
            max_new_tokens=2 * self.C,
            max_denoising_steps=2,
            on_step=lambda s: starts.append(s.block_start),
        )
        self.assertEqual(starts, [P, P, P + self.C, P + self.C])

    def generate(self, **kwargs):
        model = DecoderCalls(self.model)
        steps = []
        tokens, nfe = diffusion_generate(
            model,
            self.prompt,
            noise=fixed_noise,
            sampler=argmax,
            on_step=lambda s: steps.append(s.block),
            **kwargs,
        )
        self.assertEqual(nfe, model.calls)
        return np.array(tokens), nfe, [steps.count(c) for c in sorted(set(steps))]

    def test_reference_generate(self):
        # max_new_tokens is rounded up to whole canvases.
        tokens, nfe, per_canvas = self.generate(
            max_new_tokens=self.C + 1, max_denoising_steps=3
        )
        again, _, _ = self.generate(max_new_tokens=self.C + 1, max_denoising_steps=3)
        P = self.prompt.shape[1]
        self.assertEqual(tokens.shape, (1, P + 2 * self.C))
        self.assertEqual(tokens[0, :P].tolist(), self.prompt[0].tolist())
        self.assertEqual(tokens.tolist(), again.tolist())
        self.assertEqual(len(per_canvas), 2)
        self.assertEqual(nfe, sum(per_canvas))
        self.assertTrue(all(1 <= n <= 3 for n in per_canvas))

    def test_stability_zero_stops_after_one_step(self):
        # "Stable" always holds; the confidence threshold is above any entropy.
        _, nfe, per_canvas = self.generate(
            max_new_tokens=2 * self.C,
            max_denoising_steps=8,
            stability_threshold=0,
            confidence_threshold=100.0,
        )
        self.assertEqual((nfe, per_canvas), (2, [1, 1]))

    def test_generate_step_streams_a_canvas(self):
        # The default noise comes from MLX's generator: the same seed, the
        # same draws.
        mx.random.seed(3)
        stream = generate_step(
            self.prompt[0],
            self.model,
            max_tokens=self.C,
            sampler=argmax,
            max_denoising_steps=3,
        )
        tokens = [t for t, _ in stream]
        mx.random.seed(3)
        canvas, _ = diffusion_generate(
            self.model,
            self.prompt,
            sampler=argmax,
            max_new_tokens=self.C,
            max_denoising_steps=3,
        )
        P = self.prompt.shape[1]
        self.assertEqual(tokens, np.array(canvas)[0, P:].tolist())
        self.assertEqual(len(tokens), self.C)
""",
)

EDITS = [TEST_MODELS, TEST_DIFFUSION_IMPORT, TEST_DIFFUSION]
