# Copyright © 2026 mlx-lm-llada contributors.
"""Which masked positions a step commits: the schedules (how many), the
confidence functions (in which order) and the rules that choose (a fixed
count, Fast-dLLM's threshold and factor rules, Dream's random "origin")."""

from typing import List, Optional

import mlx.core as mx
import numpy as np


def even_counts(masked: int, steps: int) -> List[int]:
    """LLaDA's schedule: n masks over s steps, n // s each, one more for the
    first n % s steps."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def timesteps(steps: int, eps: float) -> np.ndarray:
    """Dream's ``torch.linspace(1, eps, steps + 1)`` in float32, computed the
    way torch's kernel does (from each end towards the middle), so that the
    counts truncated from it are the reference's."""
    n = steps + 1
    start, end = np.float32(1.0), np.float32(eps)
    if n == 1:
        return np.array([start], dtype=np.float32)
    step = (end - start) / np.float32(n - 1)
    half = n // 2
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        if i < half:
            out[i] = start + step * np.float32(i)
        else:
            out[i] = end - step * np.float32(n - i - 1)
    return out


def timestep_count(masked: int, step: int, ts: np.ndarray) -> int:
    """Dream's count at step ``step`` of ``len(ts) - 1``: the share
    ``1 - s / t`` of the masks left, all of them at the last step."""
    if step >= len(ts) - 2:
        return masked
    t, s = ts[step], ts[step + 1]
    return int(np.float32(masked) * (np.float32(1.0) - s / t))


def transfer_probability(step: int, ts: np.ndarray) -> float:
    """Dream's ``origin``: each masked position is committed with ``1 - s/t``."""
    if step >= len(ts) - 2:
        return 1.0
    return float(np.float32(1.0) - ts[step + 1] / ts[step])


def confidence(
    kind: str,
    logits: mx.array,
    tokens: mx.array,
    end_ids: Optional[List[int]] = None,
    logprobs: Optional[mx.array] = None,
) -> mx.array:
    """How sure the model is of each proposal ``tokens`` [B, K] (larger is
    surer), from ``logits`` [B, K, V] (float32).

    ``end_ids``: proposals of these tokens rank last (the paper's rule for
    EOS and EoT; for ``low_confidence`` their probability is 0, as LLaDA's
    code computes it). ``logprobs``, the logits' log-softmax if the caller
    has it, spares ``low_confidence`` a log-sum-exp over the vocabulary.
    """
    if kind in ("random", "origin"):
        return mx.random.uniform(shape=tokens.shape)
    if kind == "low_confidence" and not end_ids and logprobs is not None:
        # The same arithmetic: logprobs are logits - logsumexp(logits).
        return mx.exp(mx.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0])
    if kind == "low_confidence":
        if end_ids:
            logits = mx.array(logits)
            for t in end_ids:
                logits[..., t] = -mx.inf
        picked = mx.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
        return mx.exp(picked - mx.logsumexp(logits, axis=-1))
    probs = mx.softmax(logits, axis=-1)
    if kind == "topk_margin":
        top2 = mx.topk(probs, 2, axis=-1)
        conf = mx.abs(top2[..., 1] - top2[..., 0])
    elif kind == "entropy":
        conf = mx.sum(probs * mx.log(probs + 1e-10), axis=-1)
    else:
        raise ValueError(f"Unknown confidence function {kind!r}")
    if end_ids:
        is_end = mx.zeros(tokens.shape, dtype=mx.bool_)
        for t in end_ids:
            is_end = is_end | (tokens == t)
        conf = mx.where(is_end, -mx.inf, conf)
    return conf


def select(
    conf: np.ndarray,
    masked: np.ndarray,
    count: Optional[int] = None,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    alg_temp: float = 0.0,
    floor: str = "one",
) -> np.ndarray:
    """Positions to commit in one row (indices into ``conf``).

    A fixed ``count`` takes the most confident (``alg_temp`` > 0 samples them
    instead, in proportion to ``softmax(conf / alg_temp)``). ``threshold``
    takes the most confident and every other one at least that confident,
    among the first ``count`` if a count is given (the capped rule); with
    ``floor="scheduled"`` it takes every one above the threshold, and at
    least the ``count`` most confident (LLaDA 2). ``factor`` is Fast-dLLM's
    factor rule.
    """
    n = int(masked.sum())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    conf = np.where(masked, conf, -np.inf)
    if alg_temp > 0 and threshold is None and factor is None:
        # Sampling without replacement: the top k of perturbed scores
        # (Gumbel top-k), with MLX's generator so that seeds hold.
        gumbel = np.array(mx.random.gumbel(shape=conf.shape), dtype=np.float64)
        conf = np.where(masked, conf / alg_temp + gumbel, -np.inf)
    order = np.argsort(-conf, kind="stable")[:n]
    if threshold is not None and floor == "scheduled":
        above = int((conf[order] > threshold).sum())
        return order[: max(above, count)]
    if threshold is not None:
        if count is not None:
            order = order[: max(count, 0)]
        if len(order) == 0:
            return order
        # The most confident always; the others when confident enough.
        keep = np.concatenate([[True], conf[order[1:]] >= threshold])
        return order[keep]
    if factor is not None:
        # Fast-dLLM's factor rule: the largest m with (m + 1)(1 - c_m) < f.
        m = 1
        while m < n and (m + 2) * (1 - conf[order[m]]) < factor:
            m += 1
        return order[:m]
    return order[: min(count, n)]


def select_random(masked: np.ndarray, probability: float) -> np.ndarray:
    """Dream's ``origin``: every masked position with the same probability."""
    draw = np.array(mx.random.uniform(shape=masked.shape))
    return np.flatnonzero(masked & (draw < probability))
