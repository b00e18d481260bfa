# Copyright © 2026 mlx-lm-llada contributors.
"""The masked-diffusion generation strategy, one for every model family.

- :mod:`.settings`: what a model declares (``DiffusionSpec``), the sampler's
  settings (``DiffusionSettings``) and their resolution;
- :mod:`.caches`: the canvas key/value cache and the conversation cache;
- :mod:`.commit_rules`: schedules, confidence functions, commit rules;
- :mod:`.loop`: the one denoising loop (``denoise``);
- :mod:`.reference_api`: ``diffusion_generate``, the references' own call;
- :mod:`.mlx_lm_adapter`: ``stream_diffusion``, mlx-lm's ``generate_step``;
- :mod:`.model_base`: what every diffusion model file inherits;
- :mod:`.training`: the masked-diffusion loss, for mlx-lm's trainer.
"""

from .caches import BlockPrefixCache, CanvasCache, ContextCache, EncoderCache
from .loop import Step, denoise
from .mlx_lm_adapter import stream_diffusion
from .model_base import (
    DecoderLayout,
    DiffusionModel,
    block_causal_mask,
    check_config,
    check_geometry,
    key_padding_mask,
)
from .reference_api import diffusion_generate
from .settings import (
    CACHE_MODES,
    DUAL_WINDOWS,
    FAST_DEFAULTS,
    REMASKING,
    SCHEDULES,
    THRESHOLD_FLOORS,
    DiffusionSettings,
    DiffusionSpec,
    check_reference,
    check_setting_names,
    parse_setting,
    resolve_settings,
)

__all__ = [
    "CACHE_MODES",
    "DUAL_WINDOWS",
    "FAST_DEFAULTS",
    "REMASKING",
    "SCHEDULES",
    "THRESHOLD_FLOORS",
    "BlockPrefixCache",
    "CanvasCache",
    "ContextCache",
    "EncoderCache",
    "DecoderLayout",
    "DiffusionModel",
    "DiffusionSettings",
    "DiffusionSpec",
    "Step",
    "block_causal_mask",
    "check_config",
    "check_geometry",
    "check_reference",
    "check_setting_names",
    "denoise",
    "diffusion_generate",
    "key_padding_mask",
    "parse_setting",
    "resolve_settings",
    "stream_diffusion",
]
