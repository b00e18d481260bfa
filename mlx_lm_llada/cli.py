"""The diffusion flags that our commands add to mlx-lm's own commands."""

import argparse
import functools

from .diffusion_sampler import CACHE_MODES, REMASKING, set_command_settings

FLAGS = {
    # setting: (type, help)
    "steps": (int, "Denoising steps for the whole canvas (default: its length)"),
    "block_length": (int, "Tokens per semi-autoregressive block (default: 32)"),
    "remasking": (str, f"Which masked tokens to commit first: {', '.join(REMASKING)}"),
    "cfg_scale": (float, "Classifier-free guidance scale (0: off)"),
    "threshold": (float, "Fast-dLLM parallel decoding: commit every token this sure"),
    "factor": (float, "Fast-dLLM parallel decoding, factor rule"),
    "cache": (str, f"Key/value cache across steps: {', '.join(CACHE_MODES)}"),
}
BOOL_FLAGS = {
    "logits_eos_inf": "Never propose EOS (its logit is -inf)",
    "confidence_eos_eot_inf": "Give EOS and EoT proposals confidence 0",
}


def add_diffusion_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group(
        "diffusion",
        "Settings of the masked-diffusion sampler (override MLX_LM_LLADA_* "
        "variables and the model's defaults)",
    )
    for name, (kind, text) in FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    for name, text in BOOL_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"), action="store_true", default=None, help=text
        )
    return parser


def run_with_diffusion_flags(module):
    """Run ``module.main()`` (an mlx-lm command) with our flags added."""
    setup_arg_parser = module.setup_arg_parser
    names = list(FLAGS) + list(BOOL_FLAGS)

    @functools.wraps(setup_arg_parser)
    def extended_parser():
        parser = add_diffusion_flags(setup_arg_parser())
        parse_args = parser.parse_args

        def parse_and_install(*args, **kwargs):
            ns = parse_args(*args, **kwargs)
            given = {n: getattr(ns, n) for n in names}
            for n in names:
                delattr(ns, n)
            try:
                set_command_settings(**given)
            except ValueError as e:
                parser.error(str(e))
            return ns

        parser.parse_args = parse_and_install
        return parser

    module.setup_arg_parser = extended_parser
    module.main()
