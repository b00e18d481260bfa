# Copyright © 2026 mlx-lm-llada contributors.
"""The masked-diffusion generation strategy, for any model that declares it.

One denoising loop serves LLaDA's reference schedule (``generate.py``),
Fast-dLLM's prefix and dual caches, its threshold and factor rules for
parallel decoding, and early stop: they are options of :func:`denoise`.

The loop knows nothing of a model's internals. It needs

- ``model(tokens, cache=None, attention_mask=None, logits_positions=None)``,
  returning logits ``[B, L, V]`` with bidirectional attention, where a cache
  is a list of per-layer :class:`CanvasCache` and ``logits_positions`` limits
  the output head to some input positions;
- ``model.layers`` (one cache per layer);
- ``model.diffusion``, a :class:`DiffusionSpec`: the mask id, the end tokens
  and the model's default settings.
"""

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import numpy as np

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class DiffusionSpec:
    """What a diffusion model tells the strategy about itself."""

    mask_token_id: int
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    max_sequence_length: Optional[int] = None
    defaults: Dict[str, Any] = field(default_factory=dict)

    @property
    def end_token_ids(self):
        return tuple(t for t in (self.eos_token_id, self.eot_token_id) if t is not None)


_SETTING_TYPES = {
    int: numbers.Integral,
    float: numbers.Real,
    bool: (bool, np.bool_),
    str: str,
}


@dataclass
class DiffusionSettings:
    """The sampler's settings, with the reference's names.

    ``steps=None`` means one step per canvas token (the paper's best setting).
    ``threshold``/``factor`` switch to Fast-dLLM's parallel decoding (``steps``
    is then unused); ``cache`` is ``"none"``, ``"prefix"`` or ``"dual"``.
    ``reference=True`` asks for the exact reference schedule: no cache, no
    parallel rule, whatever the model's defaults say.
    """

    steps: Optional[int] = None
    block_length: int = 32
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    threshold: Optional[float] = None
    factor: Optional[float] = None
    cache: str = "none"
    reference: bool = False

    def check_values(self):
        """Raise a ValueError naming the first setting that is impossible alone."""
        self._check_types()
        if self.block_length is None or self.block_length <= 0:
            raise ValueError(f"block_length must be positive, got {self.block_length}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.remasking not in REMASKING:
            raise ValueError(
                f"remasking must be one of {REMASKING}, got {self.remasking!r}"
            )
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold and factor are two rules: set only one")

    def _check_types(self):
        # Settings also come from JSON (a server request, a config file): a
        # string or float step count would fail deep inside the loop.
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {Optional[int]: int, Optional[float]: float}.get(f.type, f.type)
            if value is None and kind is not f.type:
                continue
            is_bool = isinstance(value, (bool, np.bool_))
            if not isinstance(value, _SETTING_TYPES[kind]) or is_bool != (kind is bool):
                optional = " or null" if kind is not f.type else ""
                raise ValueError(
                    f"{f.name} must be of type {kind.__name__}{optional}, got {value!r}"
                )

    def check(self, gen_length: int):
        """Raise a ValueError naming the first impossible setting."""
        self.check_values()
        if gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {gen_length}")
        if gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({gen_length}) must be a multiple of "
                f"block_length ({self.block_length})"
            )
        blocks = gen_length // self.block_length
        if self.threshold is None and self.factor is None:
            steps = self.steps if self.steps is not None else gen_length
            if steps < blocks:
                raise ValueError(
                    f"steps ({steps}) is smaller than the number of blocks "
                    f"({blocks} blocks of {self.block_length} in {gen_length})"
                )
            if steps % blocks:
                raise ValueError(
                    f"steps ({steps}) must be a multiple of the number of blocks "
                    f"({blocks})"
                )

    def steps_per_block(self, gen_length: int) -> int:
        steps = self.steps if self.steps is not None else gen_length
        return steps // (gen_length // self.block_length)


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


@dataclass
class Step:
    """The state after one model call (what ``on_step`` receives)."""

    block: int
    step: int  # within the block
    canvas: np.ndarray  # [B, P + gen_length], live: copy it to keep it
    committed: List[np.ndarray]  # per row: canvas positions committed now
    confidence: List[np.ndarray]  # per row: their confidences
    positions: np.ndarray  # canvas positions that the logprobs rows are for
    logprobs: mx.array  # [B, len(positions), V] of this call
    nfe: int
    done: bool = False  # early stop: an end token closed every row
    block_start: int = 0  # canvas position where this block begins
    block_length: int = 0


def _num_transfer_tokens(masked: int, steps: int) -> List[int]:
    # n masks over s steps: n // s each, one more for the first n % s steps.
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _select(conf: np.ndarray, masked: np.ndarray, k, threshold, factor):
    """Positions to commit in one row of a block (indices into the block)."""
    n = int(masked.sum())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    conf = np.where(masked, conf, -np.inf)
    order = np.argsort(-conf, kind="stable")[:n]
    if threshold is not None:
        # The most confident always; the others when confident enough.
        keep = np.concatenate([[True], conf[order[1:]] >= threshold])
        return order[keep]
    if factor is not None:
        # Fast-dLLM's factor rule: the largest m with (m + 1)(1 - c_m) < f.
        m = 1
        while m < n and (m + 2) * (1 - conf[order[m]]) < factor:
            m += 1
        return order[:m]
    return order[: min(k, n)]


def denoise(
    model,
    prompt: mx.array,
    gen_length: int,
    settings: DiffusionSettings,
    attention_mask: Optional[mx.array] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    mask_id: Optional[int] = None,
    early_stop: bool = False,
    spec: Optional[DiffusionSpec] = None,
) -> Iterator[Step]:
    """Fill ``gen_length`` masks after ``prompt`` [B, P]; yield after each call.

    The canvas is filled block by block, left to right. Each step runs the
    model, proposes a token for each masked position of the block (the
    ``sampler``'s choice; argmax by default), and commits the most confident
    ones: the reference's fixed count per step, or Fast-dLLM's threshold or
    factor rule. Committed tokens are never masked again.
    """
    spec = spec or model.diffusion
    settings.check(gen_length)
    mask_id = spec.mask_token_id if mask_id is None else mask_id
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    B, P = prompt.shape
    T = P + gen_length
    block_length = settings.block_length
    fixed = settings.threshold is None and settings.factor is None
    steps_per_block = settings.steps_per_block(gen_length)
    eos, eot = spec.eos_token_id, spec.eot_token_id
    end_ids = np.array(spec.end_token_ids, dtype=np.int64)

    x = np.full((B, T), mask_id, dtype=np.int64)
    x[:, :P] = np.array(prompt, dtype=np.int64)
    prompt_index = x != mask_id
    if attention_mask is not None:
        attention_mask = mx.concatenate(
            [attention_mask, mx.ones((B, gen_length), attention_mask.dtype)], axis=1
        )
    cfg = settings.cfg_scale > 0
    if cfg and attention_mask is not None:
        attention_mask = mx.concatenate([attention_mask, attention_mask])
    caches = None
    if settings.cache != "none":
        caches = [CanvasCache() for _ in model.layers]

    def run_model(start, end, positions):
        tokens = x[:, start:end]
        if cfg:
            # The unconditional half sees the prompt as masks.
            uncond = np.where(prompt_index[:, start:end], mask_id, tokens)
            tokens = np.concatenate([tokens, uncond])
        if caches is not None:
            for c in caches:
                c.offset = start
        logits = model(
            mx.array(tokens),
            cache=caches,
            attention_mask=attention_mask,
            logits_positions=mx.array(positions - start),
        ).astype(mx.float32)
        if cfg:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + (settings.cfg_scale + 1) * (cond - uncond)
        return logits

    nfe = 0
    finished = False
    for b in range(gen_length // block_length):
        bs = P + b * block_length
        be = bs + block_length
        masked0 = x[:, bs:be] == mask_id
        schedule = [
            _num_transfer_tokens(int(m.sum()), steps_per_block) for m in masked0
        ]
        step = 0
        while (x[:, bs:be] == mask_id).any():
            # Only masked positions of the block are candidates: the output
            # head runs on those alone.
            positions = bs + np.flatnonzero((x[:, bs:be] == mask_id).any(axis=0))
            # The first call of a block (or every call, without a cache) runs
            # the whole canvas; cached calls run what the mode needs.
            if caches is None or step == 0:
                logits = run_model(0, T, positions)
            elif settings.cache == "prefix":
                logits = run_model(bs, T, positions)
            else:
                logits = run_model(bs, be, positions)
            nfe += 1

            if settings.logits_eos_inf and eos is not None:
                logits[..., eos] = -mx.inf
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            K, V = logprobs.shape[1:]
            # A proposed mask token would stay masked: the loop would run past
            # its steps (forever at temperature 0), so it is never a candidate.
            candidates = mx.array(logprobs)
            candidates[..., mask_id] = -mx.inf
            x0 = sampler(candidates.reshape(-1, V)).reshape(B, K)
            if settings.remasking == "low_confidence":
                conf_logits = logits
                if settings.confidence_eos_eot_inf:
                    # The paper's rule: EOS and EoT get confidence 0.
                    conf_logits = mx.array(logits)
                    for t in (eos, eot):
                        if t is not None:
                            conf_logits[..., t] = -mx.inf
                picked = mx.take_along_axis(conf_logits, x0[..., None], axis=-1)
                conf = mx.exp(picked[..., 0] - mx.logsumexp(conf_logits, axis=-1))
            else:
                conf = mx.random.uniform(shape=(B, K))
            mx.eval(x0, conf, logprobs)
            x0_np = np.zeros((B, block_length), dtype=np.int64)
            x0_np[:, positions - bs] = np.array(x0, dtype=np.int64)
            conf_np = np.full((B, block_length), -np.inf)
            conf_np[:, positions - bs] = np.array(conf, dtype=np.float64)

            committed, confidences = [], []
            for j in range(B):
                masked = x[j, bs:be] == mask_id
                k = schedule[j][step] if fixed and step < steps_per_block else 1
                idx = _select(
                    conf_np[j], masked, k, settings.threshold, settings.factor
                )
                x[j, bs + idx] = x0_np[j, idx]
                committed.append(bs + idx)
                confidences.append(conf_np[j, idx])
            step += 1

            if early_stop and len(end_ids):
                finished = all(_ended(row[P:], mask_id, end_ids) for row in x)
                if finished:
                    # The rest of the canvas is the end padding.
                    gen = x[:, P:]
                    gen[gen == mask_id] = eos if eos is not None else end_ids[0]
            yield Step(
                b,
                step - 1,
                x,
                committed,
                confidences,
                positions,
                logprobs,
                nfe,
                finished,
                block_start=bs,
                block_length=block_length,
            )
            if finished:
                return


def _ended(gen: np.ndarray, mask_id: int, end_ids: np.ndarray) -> bool:
    """True once an end token is committed with everything before it."""
    masks = np.flatnonzero(gen == mask_id)
    first_mask = masks[0] if len(masks) else len(gen)
    return bool(np.isin(gen[:first_mask], end_ids).any())


def diffusion_generate(
    model,
    prompt: mx.array,
    attention_mask: Optional[mx.array] = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    cache: Optional[str] = None,
    early_stop: bool = False,
    on_step: Optional[Callable[[Step], None]] = None,
):
    """LLaDA's ``generate`` (and Fast-dLLM's), with the reference's arguments.

    Args:
        prompt: Token ids ``[B, P]``; a batch is left-padded.
        attention_mask: ``[B, P]``, 1 for tokens and 0 for padding.
        sampler: Chooses candidate tokens from log-probabilities ``[N, V]``
            (mlx-lm's ``make_sampler``). Defaults to argmax, or to sampling
            from ``softmax(logits / temperature)`` when ``temperature > 0``.
        threshold, factor: Fast-dLLM's parallel decoding rules.
        cache: ``None``/``"none"``, ``"prefix"`` or ``"dual"``.
        early_stop: Stop once every row has an end token with everything
            before it committed; the rest is filled with EOS.
        on_step: Called with a :class:`Step` after each model call.

    Returns:
        ``(tokens, nfe)``: the canvas ``[B, P + gen_length]`` and the number of
        model calls.
    """
    prompt = _as_batch(prompt)
    if sampler is None and temperature > 0:
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(temp=temperature)
    settings = DiffusionSettings(
        steps=steps,
        block_length=block_length,
        remasking=remasking,
        cfg_scale=cfg_scale,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        threshold=threshold,
        factor=factor,
        cache=cache or "none",
    )
    spec = model.diffusion
    _check_length(spec, prompt.shape[1], gen_length)
    last = None
    for last in denoise(
        model,
        prompt,
        gen_length,
        settings,
        attention_mask=attention_mask,
        sampler=sampler,
        mask_id=mask_id,
        early_stop=early_stop,
        spec=spec,
    ):
        if on_step is not None:
            on_step(last)
    return mx.array(last.canvas), last.nfe


def _as_batch(prompt) -> mx.array:
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be token ids [B, P], got shape {prompt.shape}")
    if prompt.shape[1] == 0:
        raise ValueError("The prompt is empty: a diffusion model needs a prompt")
    return prompt


def _check_length(spec: DiffusionSpec, prompt_length: int, gen_length: int):
    limit = spec.max_sequence_length
    if limit is not None and prompt_length + gen_length > limit:
        raise ValueError(
            f"The prompt ({prompt_length} tokens) plus the canvas ({gen_length} "
            f"tokens) is longer than the model's context (max_sequence_length "
            f"{limit})"
        )


def parse_setting(name: str, value):
    """Convert a setting given as text (environment, config) to its type."""
    kind = {f.name: f.type for f in fields(DiffusionSettings)}[name]
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    # "none" unsets an optional number; for cache it is a mode's name.
    if text in ("none", "null", "") and kind in (Optional[int], Optional[float]):
        return None
    try:
        if kind is bool:
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (int, Optional[int]):
            return int(text)
        if kind in (float, Optional[float]):
            return float(text)
    except ValueError:
        raise ValueError(f"Diffusion setting {name}: cannot read {value!r}") from None
    return value.strip()


def check_setting_names(names, source):
    """Raise a ValueError naming any unknown setting and where it came from."""
    known = {f.name for f in fields(DiffusionSettings)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"Unknown diffusion setting(s) {', '.join(unknown)} in {source}; "
            f"known: {', '.join(sorted(known))}"
        )


def resolve_settings(
    spec: DiffusionSpec, overrides: Optional[Dict[str, Any]] = None
) -> DiffusionSettings:
    """The settings in force: the built-in defaults, then the model's (its
    module's, then its directory's ``generation_config.json``), then the
    call's keyword arguments. An explicit ``None`` (``none`` as text) turns
    an optional setting off, e.g. ``threshold=None``."""
    values: Dict[str, Any] = {}
    check_setting_names(spec.defaults, "the model's generation defaults")
    values.update({k: parse_setting(k, v) for k, v in spec.defaults.items()})
    overrides = overrides or {}
    check_setting_names(overrides, "the call")
    values.update(overrides)
    if values.get("reference"):
        check_reference(overrides)
        values.update(_REFERENCE)
    return DiffusionSettings(**values)


_REFERENCE = {"threshold": None, "factor": None, "cache": "none"}


def check_reference(given: Dict[str, Any]):
    """Refuse ``reference=True`` given together with a fast setting."""
    if not given.get("reference"):
        return
    clash = [k for k, off in _REFERENCE.items() if given.get(k, off) != off]
    if clash:
        raise ValueError(
            f"reference=True is the exact reference schedule: it cannot be "
            f"combined with {', '.join(clash)}"
        )


def stream_diffusion(
    model,
    prompt: mx.array,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    stream=None,
    logits_processors=None,
    input_embeddings=None,
    kv_bits=None,
    max_kv_size=None,
    prefill_step_size=None,
    kv_group_size=None,
    quantized_kv_start=None,
    on_step: Optional[Callable[[Step], None]] = None,
    **settings,
):
    """mlx-lm's ``generate_step`` contract for a diffusion model.

    Yields ``(token, logprobs)`` in order, each as soon as it and every token
    before it are committed. The canvas is ``max_tokens`` rounded up to whole
    blocks; generation stops early once an end token is committed after a
    complete prefix. ``prompt_cache`` (from ``model.make_cache()``) holds the
    conversation: the prompt is appended to it (without a repeated BOS) and
    each yielded token except EOS is added.
    """
    if logits_processors:
        raise ValueError(
            "Logits processors (repetition, presence or frequency penalties, "
            "logit bias) are not supported by the diffusion sampler"
        )
    if input_embeddings is not None:
        raise ValueError("The diffusion sampler does not take input embeddings")
    if kv_bits is not None:
        raise ValueError("KV-cache quantization (kv_bits) does not apply to diffusion")
    if max_kv_size is not None:
        raise ValueError(
            "max_kv_size (a rotating KV cache) does not apply to diffusion"
        )
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(
            f"max_tokens must be positive for a diffusion model (it sizes the "
            f"canvas), got {max_tokens}"
        )
    spec = model.diffusion
    config = resolve_settings(spec, settings)
    config.check_values()
    gen_length = -(-max_tokens // config.block_length) * config.block_length

    context_cache = _context_cache(prompt_cache)
    given = [int(t) for t in np.array(prompt).reshape(-1)]
    prompt = given
    if context_cache is not None:
        # The cache keeps what was said, as the caller counts it (the server
        # trims it by its own token counts); the model sees chat.py's context.
        prompt = _conversation(context_cache.tokens + given, spec)
    if not prompt:
        raise ValueError("The prompt is empty: a diffusion model needs a prompt")
    _check_length(spec, len(prompt), gen_length)
    if context_cache is not None:
        context_cache.tokens.extend(given)
    P = len(prompt)
    if prompt_progress_callback is not None:
        prompt_progress_callback(0, P)

    end_ids = set(spec.end_token_ids)
    pending = {}
    ptr = 0
    with mx.stream(stream or mx.default_stream(mx.default_device())):
        steps = denoise(
            model,
            mx.array([prompt]),
            gen_length,
            config,
            sampler=sampler,
            early_stop=True,
            spec=spec,
        )
        for st in steps:
            if on_step is not None:
                on_step(st)
            if st.nfe == 1 and prompt_progress_callback is not None:
                prompt_progress_callback(P, P)
            rows = {int(p): k for k, p in enumerate(st.positions)}
            for pos in st.committed[0]:
                pending[int(pos)] = st.logprobs[0, rows[int(pos)]]
            row = st.canvas[0]
            while ptr < max_tokens and P + ptr in pending:
                token = int(row[P + ptr])
                logprobs = pending.pop(P + ptr)
                ptr += 1
                if context_cache is not None:
                    context_cache.tokens.append(token)
                yield token, logprobs
                if token in end_ids or ptr == max_tokens:
                    return


def _conversation(tokens: List[int], spec: DiffusionSpec) -> List[int]:
    """LLaDA ``chat.py``'s context: later turns drop their BOS, EOS is removed."""
    return [
        t
        for i, t in enumerate(tokens)
        if t != spec.eos_token_id and (i == 0 or t != spec.bos_token_id)
    ]


def _context_cache(prompt_cache):
    if prompt_cache is None:
        return None
    if len(prompt_cache) != 1 or not isinstance(prompt_cache[0], ContextCache):
        raise ValueError(
            "A diffusion model's prompt cache is the one model.make_cache() "
            "returns (a ContextCache of the conversation's tokens)"
        )
    return prompt_cache[0]
