"""0003: the diffusion settings as options of generate, chat and server.

The flags are those of ``mlx_lm_llada/cli.py`` (``FLAGS``, ``BOOL_FLAGS``),
rendered as a table in mlx_lm/generate.py. In upstream form they are passed
as keyword arguments to stream_generate; the server takes them as a
request's ``diffusion`` object.
"""

from mlx_lm_llada.cli import BOOL_FLAGS, FLAGS

SUBJECT = "Diffusion settings in generate, chat and server"

BODY = """\
mlx_lm.generate and mlx_lm.chat take the diffusion sampler's settings as
flags (--steps, --block-length, --threshold, --cache, ...), passed to
stream_generate as keyword arguments; they are refused for other models.
mlx_lm.server takes them as a request's "diffusion" object, checked before
the request is queued.
"""


def _table_row(name, kind, text):
    # Black keeps a row that fits, and an exploded row with a trailing comma.
    row = f'    "{name}": ({kind}, "{text}"),'
    if len(row) <= 88:
        return row + "\n"
    return f'    "{name}": (\n        {kind},\n        "{text}",\n    ),\n'


def _table():
    rows = [_table_row(n, kind.__name__, text) for n, (kind, text) in FLAGS.items()]
    rows += [_table_row(n, "bool", text) for n, text in BOOL_FLAGS.items()]
    return "".join(rows)


HELPERS = (
    "mlx_lm/generate.py",
    "before",
    """\
def setup_arg_parser():
    \"\"\"Set up and return the argument parser.\"\"\"
""",
    f"""\
# The sampler settings of a diffusion model (see mlx_lm/diffusion/settings.py).
DIFFUSION_ARGS = {{
{_table()}}}


def add_diffusion_args(parser):
    group = parser.add_argument_group("diffusion models")
    for name, (kind, text) in DIFFUSION_ARGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=text)
        else:
            group.add_argument(flag, type=kind, help=text)


def diffusion_kwargs(args, model):
    \"\"\"The diffusion settings given on the command line, for ``model``.\"\"\"
    given = {{k: getattr(args, k) for k in DIFFUSION_ARGS}}
    # Text is read as the setting's type; "none" turns an optional one off.
    given = {{k: parse_setting(k, v) for k, v in given.items() if v is not None}}
    if given and getattr(model, "diffusion", None) is None:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{{names}}: only for diffusion models")
    return given


""",
)

GENERATE_IMPORT = (
    "mlx_lm/generate.py",
    "before",
    """\
from .generate_utils import BatchCounters, BatchCountersSnapshot, BatchStats
""",
    """\
from .diffusion import parse_setting
""",
)

GENERATE_PARSER = (
    "mlx_lm/generate.py",
    "replace",
    """\
        help="Number of tokens to draft when using speculative decoding.",
        default=3,
    )
    return parser
""",
    """\
        help="Number of tokens to draft when using speculative decoding.",
        default=3,
    )
    add_diffusion_args(parser)
    return parser
""",
)

GENERATE_MAIN = (
    "mlx_lm/generate.py",
    "after",
    """\
        num_draft_tokens=args.num_draft_tokens,
        input_embeddings=input_embeddings,
""",
    """\
        **diffusion_kwargs(args, model),
""",
)

CHAT_IMPORT = (
    "mlx_lm/chat.py",
    "replace",
    """\
from .generate import stream_generate
""",
    """\
from .generate import add_diffusion_args, diffusion_kwargs, stream_generate
""",
)

CHAT_PARSER = (
    "mlx_lm/chat.py",
    "replace",
    """\
        help="Use pipelining instead of tensor parallelism",
    )
    return parser
""",
    """\
        help="Use pipelining instead of tensor parallelism",
    )
    add_diffusion_args(parser)
    return parser
""",
)

CHAT_MAIN = (
    "mlx_lm/chat.py",
    "before",
    """\
    with ChatUI(args, rank=rank) as ui:
""",
    """\
    settings = diffusion_kwargs(args, model)

""",
)

CHAT_STREAM = (
    "mlx_lm/chat.py",
    "after",
    """\
                prompt_cache=prompt_cache,
                prefill_step_size=args.prefill_step_size,
""",
    """\
                **settings,
""",
)

SERVER_IMPORT = (
    "mlx_lm/server.py",
    "before",
    """\
from .generate import (
""",
    """\
from .diffusion import DiffusionSettings
""",
)

SERVER_ARGS = (
    "mlx_lm/server.py",
    "after",
    """\
    seed: Optional[int]
    chat_template_kwargs: Optional[Dict[str, Any]]
""",
    """\
    diffusion: Optional[Dict[str, Any]] = None
""",
)

SERVER_BODY = (
    "mlx_lm/server.py",
    "after",
    """\
        self.chat_template_kwargs = self.body.get("chat_template_kwargs")
""",
    """\
        self.diffusion = self.body.get("diffusion")
""",
)

SERVER_VALIDATE = (
    "mlx_lm/server.py",
    "after",
    """\
        self._validate("logit_bias", dict, optional=True)
""",
    """\
        self._validate("diffusion", dict, optional=True)
        if self.diffusion is not None:
            try:
                DiffusionSettings(**self.diffusion).check_values()
            except TypeError as e:
                raise ValueError(f"diffusion: {e}") from e
""",
)

SERVER_REQUEST = (
    "mlx_lm/server.py",
    "after",
    """\
            chat_template_kwargs=self.chat_template_kwargs,
""",
    """\
            diffusion=self.diffusion,
""",
)

SERVER_GENERATE = (
    "mlx_lm/server.py",
    "replace",
    """\
                quantized_kv_start=self.cli_args.quantized_kv_start,
            ):
""",
    """\
                quantized_kv_start=self.cli_args.quantized_kv_start,
                **(args.diffusion or {}),
            ):
""",
)

SERVER_DOCS = (
    "mlx_lm/SERVER.md",
    "before",
    """\
- `logprobs`: (Optional) An integer specifying the number of top tokens and
""",
    """\
- `diffusion`: (Optional) For a diffusion model, the sampler's settings, e.g.
  `{"steps": 64, "block_length": 32, "threshold": 0.9}`. See `DiffusionSettings`
  in `mlx_lm/diffusion/`.

""",
)

TEST = (
    "tests/test_diffusion.py",
    "before",
    """\


if __name__ == "__main__":
""",
    """\

    def test_command_line_settings(self):
        from mlx_lm.generate import diffusion_kwargs, setup_arg_parser

        args = setup_arg_parser().parse_args(
            ["--steps", "8", "--threshold", "none", "--logits-eos-inf"]
        )
        settings = {"steps": 8, "threshold": None, "logits_eos_inf": True}
        self.assertEqual(diffusion_kwargs(args, self.model), settings)
        with self.assertRaises(ValueError):
            diffusion_kwargs(args, object())
""",
)

EDITS = [
    GENERATE_IMPORT,
    HELPERS,
    GENERATE_PARSER,
    GENERATE_MAIN,
    CHAT_IMPORT,
    CHAT_PARSER,
    CHAT_MAIN,
    CHAT_STREAM,
    SERVER_IMPORT,
    SERVER_ARGS,
    SERVER_BODY,
    SERVER_VALIDATE,
    SERVER_REQUEST,
    SERVER_GENERATE,
    SERVER_DOCS,
    TEST,
]
