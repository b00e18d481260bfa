# Copyright © 2026 mlx-lm-llada contributors.
"""The caches of a diffusion model: keys and values of a canvas across the
steps of one generation (:class:`CanvasCache`), of a block-causal model's
finished blocks (:class:`BlockPrefixCache`), of a uniform-noise model's encoder
(:class:`EncoderCache`), and a conversation across turns (:class:`ContextCache`,
mlx-lm's prompt cache)."""

from typing import List, Optional

import mlx.core as mx
import numpy as np


class CanvasCache:
    """Keys and values of the whole canvas, for one layer.

    A full pass (``offset`` 0) fills it; a later call writes its window at
    ``offset`` and attends to the whole canvas: fresh window, stale rest.
    """

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            if self.offset != 0:
                raise ValueError("CanvasCache: the first call must cover the canvas")
            self.keys, self.values = keys, values
        else:
            self.keys[..., self.offset : end, :] = keys
            self.values[..., self.offset : end, :] = values
        return self.keys, self.values

    @property
    def state(self):
        return self.keys, self.values

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BlockPrefixCache:
    """Keys and values of a block-causal model's finished blocks: one of
    mlx-lm's ``KVCache`` per layer, and the tokens they were computed from.

    A block's keys depend only on it and the blocks before it, so once its
    tokens are final they are final too: a cache of them is exact.
    """

    def __init__(self, num_layers: int):
        from mlx_lm.models.cache import KVCache

        self.layers = [KVCache() for _ in range(num_layers)]
        self.tokens: List[int] = []
        self.block_length = None

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def keep(self, length: int, tokens=None):
        """Keep the first ``length`` positions (``tokens``: what they hold)."""
        for c in self.layers:
            c.trim(c.offset - length)
        source = self.tokens if tokens is None else tokens
        self.tokens = [int(t) for t in source[:length]]

    def reuse(self, tokens, block_length: int, limit: int) -> int:
        """Keep the longest stored prefix of ``tokens`` that ends on a block
        edge, at most ``limit`` long, and return its length. Keys of another
        block length are dropped (the blocks saw other blocks)."""
        n = 0
        if block_length == self.block_length:
            stored = np.array(self.tokens[: min(limit, len(tokens))], dtype=np.int64)
            differ = np.flatnonzero(stored != np.asarray(tokens[: len(stored)]))
            n = int(differ[0]) if len(differ) else len(stored)
            n -= n % block_length
        self.block_length = block_length
        self.keep(n)
        return n

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.layers if c.keys is not None)


class EncoderCache:
    """A uniform-noise model's causal cache: the model's own mlx-lm caches
    (``model.make_encoder_cache()``), and the tokens they hold (one
    sequence), so that a conversation's next turn encodes only what is new."""

    def __init__(self, model):
        self.make = model.make_encoder_cache
        self.layers = self.make()
        self.tokens: List[int] = []

    def reuse(self, tokens) -> int:
        """How many leading ``tokens`` are encoded already; a cache that does
        not hold a proper prefix of them starts over (mlx-lm's rotating
        caches of sliding layers cannot be trimmed back)."""
        n = len(self.tokens)
        if 0 < n < len(tokens) and self.tokens == list(tokens[:n]):
            return n
        self.layers = self.make()
        self.tokens = []
        return 0

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.layers if c.keys is not None)


class ContextCache:
    """The prompt cache of a diffusion model: the conversation's tokens.

    With bidirectional attention, keys computed for one turn go stale when
    the next turn is appended: what carries over is the token context. A
    block-causal model's cache also keeps the keys of its finished blocks
    (``keys``: a :class:`BlockPrefixCache`), a uniform-noise model's its
    encoder's causal cache (an :class:`EncoderCache`); the next turn reuses
    them as far as its tokens agree.
    """

    def __init__(self, tokens: Optional[List[int]] = None, keys=None):
        self.tokens = list(tokens or [])
        self.keys = keys

    @property
    def offset(self):
        return len(self.tokens)

    def size(self):
        return len(self.tokens)

    def empty(self):
        return not self.tokens

    @property
    def state(self):
        return mx.array(self.tokens, dtype=mx.int32)

    @state.setter
    def state(self, v):
        self.tokens = [int(t) for t in np.array(v).reshape(-1)]

    @property
    def meta_state(self):
        return ""

    @meta_state.setter
    def meta_state(self, v):
        pass

    @property
    def nbytes(self):
        keys = 0 if self.keys is None else self.keys.nbytes
        return 4 * len(self.tokens) + keys

    def extend(self, inputs: mx.array) -> mx.array:
        """Append ``inputs`` [1, L]; return the whole context [1, T]."""
        if inputs.ndim != 2 or inputs.shape[0] != 1:
            raise ValueError("A ContextCache holds one sequence: inputs [1, L]")
        self.tokens.extend(np.array(inputs).reshape(-1).tolist())
        return mx.array([self.tokens], dtype=inputs.dtype)

    def is_trimmable(self):
        return True

    def trim(self, n):
        # Stored keys are checked against the tokens when they are reused.
        n = max(0, min(len(self.tokens), n))
        if n:
            del self.tokens[-n:]
        return n
