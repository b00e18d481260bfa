# Copyright © 2026 mlx-lm-llada contributors.
"""The masked-diffusion training objective (LLaDA's), for mlx-lm's trainer.

Per sequence a time ``t ~ U[0, 1)`` gives the masking probability
``p = (1 - eps) t + eps``; every scored token is masked with probability
``p``; the loss is the cross-entropy of the masked tokens divided by ``p``.
A row's scored tokens are its answer (everything after the prompt, up to
the batch's length: the end padding too, which is how the model learns to
end); each row's sum is divided by its answer length, and the rows are
averaged. Without a prompt the answer is the whole row, and this is LLaDA's
pre-training form (divided by batch size times length).
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

EPS = 1e-3


def noise(
    scored: mx.array, eps: float = EPS, t: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """LLaDA's forward process: which scored tokens are masked, and each
    row's masking probability ``p`` ([B, 1]). Draws from MLX's generator."""
    B, L = scored.shape
    if t is None:
        t = mx.random.uniform(shape=(B,))
    p = ((1 - eps) * t + eps)[:, None]
    masked = (mx.random.uniform(shape=(B, L)) < p) & scored
    return masked, p


def diffusion_loss(
    model,
    tokens: mx.array,
    scored: mx.array,
    masked: mx.array,
    p: mx.array,
    attention_mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The objective for ``tokens`` [B, L] whose ``masked`` positions are
    replaced by the mask token; ``scored`` marks each row's answer.

    Returns the loss and the number of scored tokens."""
    spec = model.diffusion
    if spec.block_causal:
        # Block diffusion trains each block against a clean copy of the
        # blocks before it: another objective, not this one.
        raise ValueError(
            f"Fine-tuning {spec.family} (block diffusion) is not supported: "
            "the masked-diffusion loss is for bidirectional models"
        )
    inputs = mx.where(masked, spec.mask_token_id, tokens)
    logits = model(inputs, attention_mask=attention_mask)
    if spec.logits_shift:
        # Token i is read from the logits at i - 1 (token 0 from its own).
        logits = mx.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens)
    weights = masked / p / scored.sum(axis=1, keepdims=True)
    n_scored = scored.sum()
    return (ce * weights).sum() / tokens.shape[0], n_scored


def mlx_lm_loss(model, batch: mx.array, lengths: mx.array):
    """The loss in mlx-lm trainer's form (``loss(model, batch, lengths)``).

    ``lengths`` holds each row's ``(offset, length)``: the prompt (masked
    out of the loss by ``--mask-prompt``) and the row's tokens; what follows
    them up to the batch's length is end padding, part of the answer."""
    spec = model.diffusion
    if not spec.end_token_ids:
        raise ValueError("Diffusion training needs an end token for the padding")
    eos = spec.end_token_ids[0]
    positions = mx.arange(batch.shape[1])[None]
    offset, length = lengths[:, :1], lengths[:, 1:]
    if spec.eot_token_id is not None:
        # An answer ends at its last end of turn: what a chat template writes
        # after it (LLaDA's always appends an assistant header) is padding.
        eot = (batch == spec.eot_token_id) & (positions >= offset)
        eot = eot & (positions < length)
        last = batch.shape[1] - mx.argmax(eot[:, ::-1], axis=1, keepdims=True)
        length = mx.where(eot.any(axis=1, keepdims=True), last, length)
    tokens = mx.where(positions < length, batch, eos)
    scored = positions >= offset
    masked, p = noise(scored)
    return diffusion_loss(model, tokens, scored, masked, p)
