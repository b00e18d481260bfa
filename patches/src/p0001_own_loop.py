"""0001: the generic hook, in mlx-lm's own code (nothing here names a model).

The upstream form of what ``mlx_lm_llada/mlx_lm_patches.py`` does at run time:
``patch_generate`` (a)-(c) and the generic half of ``patch_utils`` (d).
Each edit is (file, how, anchor, text): the anchor must occur exactly once in
the file; ``how`` is ``replace``, ``before`` or ``after``.
"""

SUBJECT = "generate: let a model bring its own generation loop"

BODY = """\
A model that defines generate_step(prompt, **kwargs) gets every argument of
mlx_lm.generate.generate_step, plus the options that only it knows, and
yields (token, logprobs) itself. Other models are unchanged: an unknown
option still raises TypeError.

For such a model, stream_generate times the prompt by the model's
prompt_progress_callback(total, total) report instead of its first token,
and refuses a draft model; BatchGenerator refuses it.

A model module may also name the special tokens that its config.json
lacks (CONFIG_TOKENS: config key -> token text, filled from the
checkpoint's tokenizer.json), and the token texts that also end a
response (TOKENIZER_DEFAULTS["eos_tokens"]).
"""

# (a) generate_step defers to the model's own loop.
GENERATE_STEP_SIGNATURE = (
    "mlx_lm/generate.py",
    "replace",
    """\
    input_embeddings: Optional[mx.array] = None,
) -> Generator[Tuple[mx.array, mx.array], None, None]:
""",
    """\
    input_embeddings: Optional[mx.array] = None,
    **kwargs,
) -> Generator[Tuple[mx.array, mx.array], None, None]:
""",
)

GENERATE_STEP_BODY = (
    "mlx_lm/generate.py",
    "replace",
    """\
          conjunction with prompt tokens. Default: ``None``.

    Yields:
        Tuple[mx.array, mx.array]: One token and a vector of log probabilities.
    \"\"\"
""",
    """\
          conjunction with prompt tokens. Default: ``None``.
        kwargs: Options of the model's own generation loop. A model that
          defines ``generate_step`` (e.g. a diffusion model) gets all the
          arguments and yields the tokens itself.

    Yields:
        Tuple[mx.array, mx.array]: One token and a vector of log probabilities.
    \"\"\"
    if hasattr(model, "generate_step"):
        yield from model.generate_step(
            prompt,
            stream=stream,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
            max_kv_size=max_kv_size,
            prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start,
            prompt_progress_callback=prompt_progress_callback,
            input_embeddings=input_embeddings,
            **kwargs,
        )
        return
    if kwargs:
        raise TypeError(
            f"generate_step() got unexpected keyword arguments: {', '.join(kwargs)}"
        )

""",
)

# (b) stream_generate: the prompt's time, and no draft model.
STREAM_PROMPT_TIME = (
    "mlx_lm/generate.py",
    "after",
    """\
    kwargs["max_tokens"] = max_tokens

""",
    """\
    # A model's own loop may read the prompt in the call that also makes its
    # first tokens: time the prompt by the loop's progress report, and the
    # generation from the start, so that its rate counts every call.
    prompt_done = None
    if hasattr(model, "generate_step"):
        callback = kwargs.get("prompt_progress_callback") or (lambda *_: None)

        def prompt_progress(processed, total):
            nonlocal prompt_done
            if processed == total and prompt_done is None:
                prompt_done = time.perf_counter()
            callback(processed, total)

        kwargs["prompt_progress_callback"] = prompt_progress

""",
)

STREAM_NO_DRAFT = (
    "mlx_lm/generate.py",
    "before",
    """\
        kwargs.pop("max_kv_size", None)
        kwargs.pop("prompt_progress_callback", None)
""",
    """\
        if hasattr(model, "generate_step") or hasattr(draft_model, "generate_step"):
            raise ValueError(
                "Speculative decoding is not supported for models with their "
                "own generation loop."
            )
""",
)

STREAM_TIMING = (
    "mlx_lm/generate.py",
    "replace",
    """\
            if n == 0:
                prompt_time = time.perf_counter() - tic
                prompt_tps = prompt.size / prompt_time
                tic = time.perf_counter()
""",
    """\
            if n == 0:
                prompt_time = (prompt_done or time.perf_counter()) - tic
                prompt_tps = prompt.size / prompt_time
                if prompt_done is None:
                    tic = time.perf_counter()
""",
)

# (c) BatchGenerator refuses such a model.
BATCH_REFUSES = (
    "mlx_lm/generate.py",
    "before",
    """\
        self.model = model
        self.max_tokens = max_tokens
        self.sampler = sampler or greedy_sampler
""",
    """\
        if hasattr(model, "generate_step"):
            # close() (from __del__) reads this.
            self._old_wired_limit = None
            raise ValueError(
                "Batched generation is not supported for models with their own "
                "generation loop; use stream_generate for each prompt."
            )
""",
)

# (d) Tokenizer facts that a model module declares.
ADDED_TOKEN_IDS = (
    "mlx_lm/utils.py",
    "before",
    """\
def load_model(
    model_path: Path,
""",
    """\
def _added_token_ids(model_path: Path) -> Dict[str, int]:
    \"\"\"The ids of the added (special) tokens in the tokenizer.json.\"\"\"
    try:
        with open(model_path / "tokenizer.json", "r", encoding="utf-8") as f:
            added = json.load(f).get("added_tokens", [])
    except (OSError, json.JSONDecodeError):
        return {}
    return {t["content"]: t["id"] for t in added}


""",
)

CONFIG_TOKENS = (
    "mlx_lm/utils.py",
    "replace",
    """\
    else:
        model_class, model_args_class = get_model_classes(config=config)
""",
    """\
    else:
        model_class, model_args_class = get_model_classes(config=config)
        arch = importlib.import_module(model_class.__module__)

    # Special-token ids that the config lacks: CONFIG_TOKENS maps a config key
    # to the token's text, whose id the tokenizer has.
    if config_tokens := getattr(arch, "CONFIG_TOKENS", None):
        added = _added_token_ids(model_path)
        for key, token in config_tokens.items():
            if config.get(key) is None and token in added:
                config[key] = added[token]
""",
)

EOS_TOKENS = (
    "mlx_lm/tokenizer_utils.py",
    "before",
    """\
    tokenizer_config = tokenizer.init_kwargs
""",
    """\
    if eos_tokens := defaults.get("eos_tokens"):
        # Token texts that also end a response, where the vocabulary has them.
        vocab = tokenizer.get_vocab()
        eos_token_ids = list(eos_token_ids or [])
        eos_token_ids += [vocab[t] for t in eos_tokens if t in vocab]

""",
)

TESTS = (
    "tests/test_generate.py",
    "before",
    """\
if __name__ == "__main__":
""",
    """\
class TestOwnGenerationLoop(unittest.TestCase):
    class Model:
        def generate_step(self, prompt, **kwargs):
            self.kwargs = kwargs
            for token in reversed(prompt.tolist()):
                yield token, mx.zeros((8,))

    def test_generate_step_runs_the_model_loop(self):
        model = self.Model()
        tokens = [t for t, _ in generate_step(mx.array([1, 2, 3]), model, steps=4)]
        self.assertEqual(tokens, [3, 2, 1])
        self.assertEqual(model.kwargs["steps"], 4)
        self.assertEqual(model.kwargs["max_tokens"], 256)

    def test_other_models_refuse_unknown_options(self):
        from mlx_lm.models import llama

        args = llama.ModelArgs(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=1,
            intermediate_size=64,
            num_attention_heads=4,
            rms_norm_eps=1e-5,
            vocab_size=64,
        )
        with self.assertRaises(TypeError):
            next(generate_step(mx.array([1, 2]), llama.Model(args), steps=4))

    def test_batch_generator_refuses_the_model(self):
        with self.assertRaises(ValueError):
            BatchGenerator(self.Model())


""",
)

EDITS = [
    GENERATE_STEP_SIGNATURE,
    GENERATE_STEP_BODY,
    STREAM_PROMPT_TIME,
    STREAM_NO_DRAFT,
    STREAM_TIMING,
    BATCH_REFUSES,
    ADDED_TOKEN_IDS,
    CONFIG_TOKENS,
    EOS_TOKENS,
    TESTS,
]
