"""mlx-lm-llada: masked-diffusion language models (LLaDA) for mlx-lm.

This package is imported at interpreter start (by ``mlx_lm_llada.pth``), so it
imports nothing heavy itself: the public API below loads on first use.
"""

__version__ = "0.1.0"

__all__ = ["diffusion_generate", "DiffusionSettings"]


def __getattr__(name):
    if name in __all__:
        from . import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module 'mlx_lm_llada' has no attribute {name!r}")
