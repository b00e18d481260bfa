# Copyright © 2026 mlx-lm-llada contributors.
"""What a diffusion model declares (:class:`DiffusionSpec`), the sampler's
settings (:class:`DiffusionSettings`) and where they come from."""

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

import numpy as np

# How a step ranks the masked positions: the probability of the proposal
# (LLaDA's low_confidence, Dream's maskgit_plus), top-1 minus top-2
# probability, negative entropy, random order, or Dream's "origin" (each
# position is committed with the schedule's probability).
REMASKING = ("low_confidence", "topk_margin", "entropy", "random", "origin")
CACHE_MODES = ("none", "prefix", "dual")
# How many tokens a fixed-count step commits: an even split of the block's
# masks over its steps (LLaDA), of the block's length (LLaDA 2: a block that
# begins in the prompt keeps a full block's counts), or Dream's timesteps.
SCHEDULES = ("even", "block", "timesteps")
# What a threshold step commits besides the proposals above the threshold:
# at least one (Fast-dLLM, ">= threshold") or at least the scheduled count
# (LLaDA 2, "> threshold").
THRESHOLD_FLOORS = ("one", "scheduled")
# What a dual-cache call recomputes: the whole block (Fast-dLLM), or its tail
# from the first position still masked or committed by the step before.
DUAL_WINDOWS = ("block", "tail")
# How a model attends: to the whole sequence, or (block diffusion: LLaDA 2)
# to its own block and every block before it, blocks aligned to position 0.
ATTENTION = ("bidirectional", "block_causal")


# Fast-dLLM's decoding (blocks of 32, dual cache, threshold 0.9): what LLaDA
# and Dream decode with unless told otherwise.
FAST_DEFAULTS = {
    "block_length": 32,
    "remasking": "low_confidence",
    "cache": "dual",
    "threshold": 0.9,
}


@dataclass(frozen=True)
class DiffusionSpec:
    """What a diffusion model tells the strategy about itself.

    ``logits_shift`` is 1 for models whose token at position i is read from
    the logits at position i - 1 (Dream: initialised from an autoregressive
    model). ``reference`` holds the settings that ``reference=True`` forces:
    the family's exact reference schedule. ``family`` names the model family
    in messages. ``attention`` is ``"bidirectional"`` or ``"block_causal"``
    (blocks of the sampler's ``block_length``, aligned to position 0: the
    prompt's tail shares the first generated block, and the keys of finished
    blocks never change, so a cache of them is exact).

    ``noise`` is ``"mask"`` (a canvas starts as mask tokens, and a committed
    token is final) or ``"uniform"`` (DiffusionGemma: a canvas starts as
    random tokens of the ``vocab_size`` rows, every position is proposed
    again at every step, and the canvas is committed when it is stable and
    confident; ``mask_token_id`` is then None).
    """

    mask_token_id: Optional[int]
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    max_sequence_length: Optional[int] = None
    logits_shift: int = 0
    family: str = "LLaDA"
    attention: str = "bidirectional"
    noise: str = "mask"
    vocab_size: Optional[int] = None
    pad_token_id: Optional[int] = None
    more_end_token_ids: Tuple[int, ...] = ()
    defaults: Dict[str, Any] = field(default_factory=dict)
    reference: Dict[str, Any] = field(
        default_factory=lambda: {"threshold": None, "factor": None, "cache": "none"}
    )

    @classmethod
    def from_args(
        cls, args, defaults: Dict[str, Any] = FAST_DEFAULTS, **traits
    ) -> "DiffusionSpec":
        """The spec of a model whose ``ModelArgs`` carry the special token ids
        (``mask_token_id``, ``eos_token_id``, ``eot_token_id``) and the
        checkpoint's ``diffusion_defaults``, which override ``defaults``."""
        return cls(
            mask_token_id=args.mask_token_id,
            eos_token_id=args.eos_token_id,
            eot_token_id=args.eot_token_id,
            defaults={**defaults, **(args.diffusion_defaults or {})},
            **traits,
        )

    @property
    def block_causal(self) -> bool:
        return self.attention == "block_causal"

    @property
    def end_token_ids(self):
        ends = (self.eos_token_id, self.eot_token_id, *self.more_end_token_ids)
        return tuple(dict.fromkeys(t for t in ends if t is not None))


_SETTING_TYPES = {
    int: numbers.Integral,
    float: numbers.Real,
    bool: (bool, np.bool_),
    str: str,
}


@dataclass
class DiffusionSettings:
    """The sampler's settings, with the references' names.

    ``steps=None`` means one step per canvas token (the paper's best setting);
    ``block_length=None`` makes the whole canvas one block (Dream's own loop).
    ``threshold``/``factor`` switch to Fast-dLLM's parallel decoding (``steps``
    is then unused, unless ``capped_threshold``: Fast-dLLM's Dream rule, where
    a step commits at most its scheduled count plus what earlier steps
    deferred). ``cache`` is ``"none"``, ``"prefix"`` or ``"dual"``.
    ``reference=True`` asks for the model's exact reference schedule, whatever
    its defaults say.

    LLaDA 2's decoding: ``schedule="block"`` (``steps`` then counts the steps
    of each block), ``threshold_floor="scheduled"`` (a step commits every
    proposal above ``threshold``, at least its scheduled count), and LLaDA
    2.1's ``num_to_transfer`` (that count for every step, ``steps`` unused)
    and token editing: with ``editing_threshold``, a step also rewrites the
    block's generated tokens whose proposal differs and is more probable than
    it; once the block has no mask, up to ``max_post_steps`` more steps edit
    it, and it ends at the first step that changes nothing.

    ``suffix_length`` (DPad's suffix dropout, an approximation): a model
    call sees the canvas up to this many positions past the current block,
    not the masks beyond, which are still to come (None: the whole canvas).
    ``dual_window="tail"`` (an approximation): a dual-cache call recomputes
    the block from its first position that is still masked or was committed
    by the step before; the keys before it stay as they were computed.
    """

    steps: Optional[int] = None
    block_length: Optional[int] = 32
    remasking: str = "low_confidence"
    schedule: str = "even"
    eps: float = 1e-3
    alg_temp: float = 0.0
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    threshold: Optional[float] = None
    factor: Optional[float] = None
    capped_threshold: bool = False
    threshold_floor: str = "one"
    num_to_transfer: Optional[int] = None
    editing_threshold: Optional[float] = None
    max_post_steps: int = 16
    cache: str = "none"
    suffix_length: Optional[int] = None
    dual_window: str = "block"
    reference: bool = False
    # Uniform noise (DiffusionGemma), with its reference's names.
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def check_values(self):
        """Raise a ValueError naming the first impossible setting or pair."""
        self.check_each()
        self.check_combination()

    def check_each(self):
        """Raise a ValueError naming the first setting that is impossible alone."""
        self._check_types()
        if self.block_length is not None and self.block_length <= 0:
            raise ValueError(f"block_length must be positive, got {self.block_length}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        for name, allowed in (
            ("remasking", REMASKING),
            ("schedule", SCHEDULES),
            ("cache", CACHE_MODES),
            ("threshold_floor", THRESHOLD_FLOORS),
            ("dual_window", DUAL_WINDOWS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.alg_temp < 0:
            raise ValueError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")
        if self.num_to_transfer is not None and self.num_to_transfer <= 0:
            raise ValueError(
                f"num_to_transfer must be positive, got {self.num_to_transfer}"
            )
        if self.max_denoising_steps <= 0:
            raise ValueError(
                f"max_denoising_steps must be positive, got {self.max_denoising_steps}"
            )
        if self.stability_threshold < 0:
            raise ValueError(
                f"stability_threshold must be >= 0, got {self.stability_threshold}"
            )
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(
                f"the temperatures must be 0 < t_min <= t_max, got t_min "
                f"{self.t_min}, t_max {self.t_max}"
            )
        if self.entropy_bound < 0:
            raise ValueError(f"entropy_bound must be >= 0, got {self.entropy_bound}")
        if self.suffix_length is not None and self.suffix_length < 0:
            raise ValueError(
                f"suffix_length must be >= 0 or None, got {self.suffix_length}"
            )
        if self.max_post_steps < 0:
            raise ValueError(f"max_post_steps must be >= 0, got {self.max_post_steps}")

    def check_combination(self):
        """Raise a ValueError naming settings that cannot work together.

        Checked on the settings in force: a command's flag alone may rely on
        the model's defaults (``--capped-threshold`` on Dream's threshold)."""
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold and factor are two rules: set only one")
        if self.capped_threshold and self.threshold is None:
            raise ValueError("capped_threshold caps the threshold rule: set threshold")
        if self.threshold_floor == "scheduled" and self.threshold is None:
            raise ValueError(
                "threshold_floor='scheduled' floors the threshold rule: set threshold"
            )
        parallel = self.threshold is not None or self.factor is not None
        if parallel and self.remasking == "origin":
            raise ValueError(
                "remasking='origin' commits positions at random: it cannot be "
                "combined with threshold or factor"
            )
        if self.dual_window != "block" and self.cache != "dual":
            raise ValueError(
                f"dual_window={self.dual_window!r} is a mode of the dual cache: "
                f"set cache='dual' (got cache={self.cache!r})"
            )

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

    @property
    def fixed_count(self) -> bool:
        """Steps commit a scheduled number of tokens (no parallel rule)."""
        return self.threshold is None and self.factor is None

    def block_size(self, gen_length: int) -> int:
        return gen_length if self.block_length is None else self.block_length

    def check(self, gen_length: int, whole_blocks: bool = True):
        """Raise a ValueError naming the first impossible setting.

        ``whole_blocks=False`` (a canvas from a template, or blocks aligned
        to position 0) lets the canvas end inside a block."""
        self.check_values()
        if gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {gen_length}")
        block_length = self.block_size(gen_length)
        if whole_blocks and gen_length % block_length:
            raise ValueError(
                f"gen_length ({gen_length}) must be a multiple of "
                f"block_length ({block_length})"
            )
        if self.schedule == "block" or self.num_to_transfer is not None:
            return  # steps count per block, or are unused
        blocks = self.blocks(gen_length)
        if self.fixed_count or self.capped_threshold:
            steps = self.steps if self.steps is not None else blocks * block_length
            if steps < blocks:
                raise ValueError(
                    f"steps ({steps}) is smaller than the number of blocks "
                    f"({blocks} blocks of {block_length} in {gen_length})"
                )
            if steps % blocks:
                raise ValueError(
                    f"steps ({steps}) must be a multiple of the number of blocks "
                    f"({blocks})"
                )

    def blocks(self, gen_length: int) -> int:
        return -(-gen_length // self.block_size(gen_length))

    def steps_per_block(self, gen_length: int) -> int:
        if self.schedule == "block":
            return self.steps or self.block_size(gen_length)
        if self.steps is None:
            return self.block_size(gen_length)
        return self.steps // self.blocks(gen_length)


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
    foreign = sorted(set(overrides) - applicable_settings(spec))
    if foreign:
        kind = "uniform-noise" if spec.noise == "uniform" else "masked-diffusion"
        raise ValueError(
            f"Diffusion setting(s) {', '.join(foreign)} do not apply to "
            f"{spec.family}, a {kind} model"
        )
    values.update(overrides)
    if values.get("reference"):
        check_reference(overrides, spec)
        values.update(exact_settings(spec))
    return DiffusionSettings(**values)


# What every family's exact schedule turns off: approximations of ours.
EXACT = {"suffix_length": None, "dual_window": "block"}


def exact_settings(spec: Optional[DiffusionSpec] = None) -> Dict[str, Any]:
    """The settings that ``reference=True`` forces for ``spec``."""
    return {**EXACT, **(spec or DiffusionSpec(0)).reference}


# The settings of the uniform-noise loop; the others are masked diffusion's.
UNIFORM_SETTINGS = frozenset(
    (
        "max_denoising_steps",
        "entropy_bound",
        "t_min",
        "t_max",
        "stability_threshold",
        "confidence_threshold",
    )
)
SHARED_SETTINGS = frozenset(("block_length", "reference"))


def applicable_settings(spec: DiffusionSpec):
    """The settings that mean something for ``spec``'s kind of noise."""
    if spec.noise == "uniform":
        return UNIFORM_SETTINGS | SHARED_SETTINGS
    return frozenset(f.name for f in fields(DiffusionSettings)) - UNIFORM_SETTINGS


def check_reference(given: Dict[str, Any], spec: Optional[DiffusionSpec] = None):
    """Refuse ``reference=True`` given together with a setting it forces."""
    if not given.get("reference"):
        return
    forced = exact_settings(spec)
    clash = sorted(k for k, v in forced.items() if k in given and given[k] != v)
    if clash:
        family = f"{spec.family}'s" if spec is not None else "the"
        raise ValueError(
            f"reference=True is {family} exact reference schedule: it cannot be "
            f"combined with {', '.join(clash)}"
        )
