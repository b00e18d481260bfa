"""``mlx_lm_llada.generate``: ``mlx_lm.generate`` with the diffusion flags."""

import importlib

from .cli import run_with_diffusion_flags


def main():
    run_with_diffusion_flags(importlib.import_module("mlx_lm.generate"))


if __name__ == "__main__":
    main()
