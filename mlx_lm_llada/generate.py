"""``mlx_lm_llada.generate``: ``mlx_lm.generate`` with the diffusion flags and
fill in the middle (``--suffix``, ``{{fill}}`` gaps in the prompt)."""

import importlib

from .cli import run_with_diffusion_flags


def main():
    run_with_diffusion_flags(importlib.import_module("mlx_lm.generate"), infill=True)


if __name__ == "__main__":
    main()
