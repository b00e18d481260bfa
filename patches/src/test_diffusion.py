# Copyright © 2026 mlx-lm-llada contributors.

import unittest

import mlx.core as mx
import numpy as np

from mlx_lm.diffusion import CanvasCache, diffusion_generate
from mlx_lm.generate import generate_step
from mlx_lm.models import llada

MASK, BOS, EOS, EOT = 63, 60, 61, 62


def tiny_llada(**kwargs):
    mx.random.seed(0)
    args = llada.ModelArgs(
        model_type="llada",
        d_model=32,
        n_heads=4,
        n_layers=2,
        vocab_size=64,
        mask_token_id=MASK,
        mlp_hidden_size=64,
        **kwargs,
    )
    model = llada.Model(args)
    mx.eval(model.parameters())
    return model


class Recorder:
    """Wraps a model: records the length of each call, may add logit biases."""

    def __init__(self, model, bias=None):
        self.model = model
        self.bias = bias
        self.lengths = []

    def __call__(self, inputs, **kwargs):
        self.lengths.append(inputs.shape[1])
        logits = self.model(inputs, **kwargs)
        return logits if self.bias is None else logits + self.bias

    def __getattr__(self, name):
        return getattr(self.model, name)


class TestDiffusion(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_llada()
        cls.prompt = mx.array([[BOS, 1, 2, 3, 4]])

    def commits(self, **kwargs):
        counts = []
        tokens, nfe = diffusion_generate(
            self.model,
            self.prompt,
            on_step=lambda s: counts.append(len(s.committed[0])),
            **kwargs,
        )
        return np.array(tokens), nfe, counts

    def test_reference_schedule(self):
        # 8 masks over 4 steps of a block: 2 a step; over 3 steps: 3, 3, 2.
        tokens, nfe, counts = self.commits(steps=8, gen_length=16, block_length=8)
        self.assertEqual(counts, [2] * 8)
        self.assertEqual(nfe, 8)
        tokens, nfe, counts = self.commits(steps=6, gen_length=16, block_length=8)
        self.assertEqual(counts, [3, 3, 2] * 2)
        self.assertFalse((tokens == MASK).any())
        self.assertEqual(tokens[0, :5].tolist(), self.prompt[0].tolist())

    def test_threshold_commits_in_fewer_calls(self):
        # Threshold 0 commits a whole block per call; 1 one token per call.
        _, nfe, counts = self.commits(gen_length=16, block_length=8, threshold=0.0)
        self.assertEqual((nfe, counts), (2, [8, 8]))
        _, nfe, _ = self.commits(gen_length=16, block_length=8, threshold=1.0)
        self.assertEqual(nfe, 16)
        _, nfe, _ = self.commits(gen_length=16, block_length=8, factor=1.0)
        self.assertLessEqual(nfe, 16)

    def test_cache_calls(self):
        # Each block starts with a full pass; then the prefix cache runs the
        # block and what follows, the dual cache the block alone.
        T, P = 5 + 16, 5
        expected = {
            "none": [T] * 8,
            "prefix": [T] + [T - P] * 3 + [T] + [T - P - 8] * 3,
            "dual": [T, 8, 8, 8] * 2,
        }
        for cache, lengths in expected.items():
            model = Recorder(self.model)
            _, nfe = diffusion_generate(
                model, self.prompt, steps=8, gen_length=16, block_length=8, cache=cache
            )
            self.assertEqual((cache, model.lengths), (cache, lengths))
            self.assertEqual(nfe, 8)

    def test_canvas_cache_window_is_exact(self):
        # With nothing changed, a cached window equals the full pass there.
        x = mx.array([[BOS, 1, 2, 3] + [MASK] * 8])
        full = self.model(x)
        caches = [CanvasCache() for _ in self.model.layers]
        self.assertTrue(mx.allclose(self.model(x, cache=caches), full, atol=1e-5))
        for c in caches:
            c.offset = 4
        window = self.model(x[:, 4:8], cache=caches)
        self.assertTrue(mx.allclose(window, full[:, 4:8], atol=1e-5))

    def test_early_stop(self):
        # A model sure of EOS everywhere: the first call commits EOS first.
        model = Recorder(tiny_llada(eos_token_id=EOS, eot_token_id=EOT))
        model.bias = mx.zeros((64,)).at[EOS].add(100.0)
        tokens, nfe = diffusion_generate(
            model, self.prompt, steps=16, gen_length=16, block_length=8, early_stop=True
        )
        self.assertEqual(nfe, 1)
        self.assertEqual(np.array(tokens)[0, 5:].tolist(), [EOS] * 16)
        _, nfe = diffusion_generate(
            model, self.prompt, steps=16, gen_length=16, block_length=8
        )
        self.assertEqual(nfe, 16)

    def test_batch_with_padding(self):
        # Left padding is masked out: its token ids do not matter, a row does
        # not depend on the other rows, and (rotary positions being relative)
        # a padded row generates what the prompt alone does.
        prompt = mx.array([[0, 0, BOS, 1, 2], [BOS, 4, 3, 2, 1]])
        mask = mx.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        kwargs = dict(steps=8, gen_length=16, block_length=8, attention_mask=mask)
        batch, _ = diffusion_generate(self.model, prompt, **kwargs)
        repadded, _ = diffusion_generate(self.model, prompt.at[0, :2].add(7), **kwargs)
        self.assertEqual(
            np.array(batch)[:, 5:].tolist(), np.array(repadded)[:, 5:].tolist()
        )
        kwargs["attention_mask"] = mask[:1]
        alone, _ = diffusion_generate(self.model, prompt[:1], **kwargs)
        self.assertEqual(np.array(batch)[0].tolist(), np.array(alone)[0].tolist())
        del kwargs["attention_mask"]
        unpadded, _ = diffusion_generate(self.model, prompt[:1, 2:], **kwargs)
        self.assertEqual(
            np.array(batch)[0, 2:].tolist(), np.array(unpadded)[0].tolist()
        )

    def test_generate_step(self):
        # mlx-lm's generate_step runs the model's own loop with its options.
        tokens, _ = diffusion_generate(
            self.model, self.prompt, steps=16, gen_length=16, block_length=8
        )
        stream = generate_step(
            self.prompt[0],
            self.model,
            max_tokens=10,
            steps=16,
            block_length=8,
            reference=True,
        )
        self.assertEqual([t for t, _ in stream], np.array(tokens)[0, 5:15].tolist())


if __name__ == "__main__":
    unittest.main()
