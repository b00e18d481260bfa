"""The diffusion flags that our commands add to mlx-lm's own commands."""

import argparse
import functools

from .diffusion import (
    CACHE_MODES,
    DUAL_WINDOWS,
    REMASKING,
    SCHEDULES,
    THRESHOLD_FLOORS,
)
from .infill import parse_gaps, template
from .mlx_lm_patches import has_own_generation
from .plugin_settings import set_command_settings
from .visualize import watch_command

FLAGS = {
    # setting: (type, help)
    "steps": (
        str,
        "Denoising steps for the whole canvas (default: its length; with "
        "--schedule block, per block)",
    ),
    "block_length": (
        str,
        "Tokens per semi-autoregressive block (default: 32; 'none': the whole "
        "canvas at once)",
    ),
    "remasking": (str, f"Which masked tokens to commit first: {', '.join(REMASKING)}"),
    "schedule": (
        str,
        f"How many tokens each step commits: {', '.join(SCHEDULES)} (Dream's)",
    ),
    "eps": (float, "The timestep schedule's last time (default: 1e-3)"),
    "alg_temp": (
        float,
        "Sample which positions to commit, softmax(confidence / alg_temp) (0: "
        "the most confident)",
    ),
    "cfg_scale": (float, "Classifier-free guidance scale (0: off)"),
    "threshold": (
        str,
        "Fast-dLLM parallel decoding: commit every token this sure ('none': off)",
    ),
    "factor": (str, "Fast-dLLM parallel decoding, factor rule ('none': off)"),
    "threshold_floor": (
        str,
        f"What a threshold step commits at least: {', '.join(THRESHOLD_FLOORS)} "
        "(LLaDA 2: its scheduled count)",
    ),
    "num_to_transfer": (
        str,
        "Tokens every step commits at least, steps unused (LLaDA 2.1; 'none': off)",
    ),
    "editing_threshold": (
        str,
        "Token editing (LLaDA 2.1): rewrite a generated token whose proposal "
        "is this sure ('none': off)",
    ),
    "max_post_steps": (int, "Editing steps after a block is full (default: 16)"),
    # Uniform noise (DiffusionGemma), the reference's names.
    "max_denoising_steps": (int, "Uniform noise: steps per canvas at most (48)"),
    "entropy_bound": (
        float,
        "Uniform noise: a step keeps the surest proposals whose entropies sum "
        "to at most this (0.1)",
    ),
    "t_min": (float, "Uniform noise: the last step's temperature (0.4)"),
    "t_max": (float, "Uniform noise: the first step's temperature (0.8)"),
    "stability_threshold": (
        int,
        "Uniform noise: steps the argmax canvas must stay the same to stop (1)",
    ),
    "confidence_threshold": (
        float,
        "Uniform noise: the mean entropy below which a canvas may stop (0.005)",
    ),
    "cache": (str, f"Key/value cache across steps: {', '.join(CACHE_MODES)}"),
    "dual_window": (
        str,
        f"What a dual-cache call recomputes: {', '.join(DUAL_WINDOWS)} (tail: "
        "from the block's first position still masked or just committed; an "
        "approximation)",
    ),
    "suffix_length": (
        str,
        "Calls see the canvas only this far past the current block (DPad's "
        "suffix dropout, an approximation; 'none': the whole canvas)",
    ),
}
BOOL_FLAGS = {
    "logits_eos_inf": "Never propose EOS (its logit is -inf)",
    "confidence_eos_eot_inf": "Give EOS and EoT proposals confidence 0",
    "capped_threshold": "Threshold decoding commits at most the scheduled count "
    "plus what earlier steps deferred (Fast-dLLM's Dream rule)",
    "reference": "Decode with the exact reference schedule (no cache, fixed steps)",
}
WATCH_FLAGS = {
    # option: argparse keywords (see visualize.py)
    "visualize": dict(
        action="store_true",
        help="Redraw the canvas in the terminal while it fills (mlx-lm's text "
        "follows); without a terminal, print a plain summary",
    ),
    "trace": dict(
        metavar="FILE.jsonl", help="Record every denoising step as JSON lines"
    ),
    "trace_html": dict(
        metavar="FILE.html",
        help="Write a self-contained page that replays the fill",
    ),
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


def add_watch_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("watch the canvas fill")
    for name, kwargs in WATCH_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), **kwargs)
    return parser


def add_infill_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group(
        "fill in the middle",
        "A gap inside --prompt is written {{fill}} (--max-tokens tokens) or "
        "{{fill:N}} (N tokens); the output is the fill. The prompt is then "
        "raw text: no chat template is applied.",
    )
    group.add_argument(
        "--suffix",
        metavar="TEXT",
        help="Fixed text after the generated tokens: fill the gap between the "
        "prompt and it",
    )
    return parser


def fill_in_the_middle(module, ns):
    """Turn --suffix and the prompt's gaps into the model loop's template.

    Returns an undo function, or None when the command fills no gap."""
    prompt = ns.prompt.replace("\\n", "\n").replace("\\t", "\t")
    segments = parse_gaps(prompt, ns.max_tokens)
    if ns.suffix is not None:
        suffix = ns.suffix.replace("\\n", "\n").replace("\\t", "\t")
        if len(segments) == 1:
            segments += [ns.max_tokens, suffix]
        else:
            segments[-1] += suffix
    if len(segments) == 1:
        return None
    generate = module.generate

    @functools.wraps(generate)
    def filling_generate(model, tokenizer, prompt, *args, **kwargs):
        if not has_own_generation(model):
            raise SystemExit(
                "Fill in the middle (--suffix, {{fill}}) needs a diffusion "
                "model: an autoregressive model can only continue."
            )
        _, layout = template(tokenizer, segments)
        return generate(model, tokenizer, prompt, *args, template=layout, **kwargs)

    ns.prompt = segments[0]
    ns.ignore_chat_template = True
    ns.max_tokens = sum(s for s in segments if isinstance(s, int))
    module.generate = filling_generate

    def undo():
        module.generate = generate

    return undo


def run_with_diffusion_flags(module, infill=False):
    """Run ``module.main()`` (an mlx-lm command) with our flags added
    (``infill``: and the fill-in-the-middle ones, for ``generate``)."""
    setup_arg_parser = module.setup_arg_parser
    names = list(FLAGS) + list(BOOL_FLAGS)
    undo = []

    @functools.wraps(setup_arg_parser)
    def extended_parser():
        parser = add_watch_flags(add_diffusion_flags(setup_arg_parser()))
        if infill:
            add_infill_flags(parser)
        parse_args = parser.parse_args

        def parse_and_install(*args, **kwargs):
            ns = parse_args(*args, **kwargs)
            given = {n: getattr(ns, n) for n in names}
            watch = {n: getattr(ns, n) for n in WATCH_FLAGS}
            for n in names + list(WATCH_FLAGS):
                delattr(ns, n)
            try:
                set_command_settings(**given)
                undo.append(watch_command(module, **watch))
                if infill:
                    undo.append(fill_in_the_middle(module, ns) or (lambda: None))
                    delattr(ns, "suffix")
            except (ValueError, OSError) as e:
                parser.error(str(e))
            return ns

        parser.parse_args = parse_and_install
        return parser

    module.setup_arg_parser = extended_parser
    try:
        module.main()
    finally:
        for u in undo:
            u()
