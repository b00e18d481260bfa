"""Diffusion settings that reach mlx-lm's generation from outside the call.

The unchanged ``mlx_lm.*`` commands take no diffusion flags, so the plugin
reads ``MLX_LM_LLADA_<SETTING>`` variables; our own commands' flags override
them; the call's keyword arguments override both (the registration hook
merges these under the call's, see ``mlx_lm_patches.patch_generate``).
"""

import os
from typing import Any, Dict

from .diffusion import (
    DiffusionSettings,
    check_reference,
    check_setting_names,
    parse_setting,
)

ENV_PREFIX = "MLX_LM_LLADA_"
_ENV_RESERVED = {"MLX_LM_LLADA_DISABLE"}

# Settings given by our commands' flags.
_command_settings: Dict[str, Any] = {}


def environment_settings(environ=None) -> Dict[str, Any]:
    """Settings from ``MLX_LM_LLADA_<NAME>`` variables (e.g. ``..._STEPS``)."""
    environ = os.environ if environ is None else environ
    found = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in environ.items()
        if k.startswith(ENV_PREFIX) and k not in _ENV_RESERVED
    }
    check_setting_names(found, "the environment (MLX_LM_LLADA_*)")
    return {k: parse_setting(k, v) for k, v in found.items()}


def set_command_settings(**settings):
    """Install the settings given on a command line.

    ``None`` means not given; the text ``none`` turns a setting off."""
    settings = {
        k: parse_setting(k, v) if isinstance(v, str) else v
        for k, v in settings.items()
        if v is not None
    }
    check_setting_names(settings, "the command's flags")
    # Fail now, not mid-run; a pair is checked once the model's defaults are
    # merged (a flag may rely on them).
    DiffusionSettings(**settings).check_each()
    check_reference(settings)
    _command_settings.clear()
    _command_settings.update(settings)


def outside_settings() -> Dict[str, Any]:
    """The environment's settings, overridden by the command's flags."""
    return {**environment_settings(), **_command_settings}
