# Copyright © 2026 mlx-lm-llada contributors.
"""The caches of a diffusion model: keys and values of a canvas across the
steps of one generation (:class:`CanvasCache`), and a conversation's tokens
across turns (:class:`ContextCache`, mlx-lm's prompt cache)."""

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


class ContextCache:
    """The prompt cache of a diffusion model: the conversation's tokens.

    Attention is bidirectional, so keys computed for one turn go stale when
    the next turn is appended; what carries over is the token context.
    """

    def __init__(self, tokens: Optional[List[int]] = None):
        self.tokens = list(tokens or [])

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
        return 4 * len(self.tokens)

    def extend(self, inputs: mx.array) -> mx.array:
        """Append ``inputs`` [1, L]; return the whole context [1, T]."""
        if inputs.ndim != 2 or inputs.shape[0] != 1:
            raise ValueError("A ContextCache holds one sequence: inputs [1, L]")
        self.tokens.extend(np.array(inputs).reshape(-1).tolist())
        return mx.array([self.tokens], dtype=inputs.dtype)

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = max(0, min(len(self.tokens), n))
        if n:
            del self.tokens[-n:]
        return n
