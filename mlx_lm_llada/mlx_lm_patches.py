"""The run-time changes that the registration hook makes to mlx-lm's modules.

Each one is generic (no ``model_type`` check in mlx-lm's code paths): a model
that defines ``generate_step`` brings its own generation loop, and a model
that declares ``diffusion`` settings is not causal.
"""

import functools
import inspect
import json
import logging
import sys
import threading
import time
import warnings
from pathlib import Path

from .registration_hook import MODEL_ARCHITECTURES, MODEL_MODULES


def has_own_generation(model):
    return callable(getattr(model, "generate_step", None))


def patch_generate(module):
    """``generate_step`` defers to the model's own loop; the rest refuse it."""
    if getattr(module, "_mlx_lm_llada_patched", False):
        return
    generate_step = module.generate_step

    @functools.wraps(generate_step)
    def deferring_generate_step(prompt, model, *args, **kwargs):
        if has_own_generation(model):
            from .plugin_settings import outside_settings

            if args:
                kwargs["stream"] = args[0]
            # The environment and our flags sit under the call's settings.
            return model.generate_step(prompt, **{**outside_settings(), **kwargs})
        return generate_step(prompt, model, *args, **kwargs)

    speculative_generate_step = module.speculative_generate_step

    @functools.wraps(speculative_generate_step)
    def refusing_speculative_generate_step(prompt, model, draft_model, *a, **kw):
        for m in (model, draft_model):
            if has_own_generation(m):
                raise ValueError(
                    f"Speculative decoding (a draft model) is not supported for "
                    f"{type(m).__module__.rsplit('.', 1)[-1]} models, which bring "
                    "their own generation loop. Generate without --draft-model."
                )
        return speculative_generate_step(prompt, model, draft_model, *a, **kw)

    batch_init = module.BatchGenerator.__init__

    @functools.wraps(batch_init)
    def refusing_batch_init(self, model, *args, **kwargs):
        if has_own_generation(model):
            # __del__ calls close(), which reads this: refuse without a
            # second, "Exception ignored" error when the object is collected.
            self._old_wired_limit = None
            raise ValueError(
                "Batched generation (BatchGenerator, batch_generate) is not "
                "supported for models that bring their own generation loop, "
                "such as diffusion models. Use stream_generate/generate per "
                "prompt, or mlx_lm_llada.diffusion_generate for a batch."
            )
        batch_init(self, model, *args, **kwargs)

    stream_generate = module.stream_generate

    @functools.wraps(stream_generate)
    def timed_stream_generate(model, *args, **kwargs):
        if not has_own_generation(model):
            yield from stream_generate(model, *args, **kwargs)
            return
        # A diffusion model reads the prompt in the call that also makes the
        # first tokens (often all of them): the prompt's rate is its first
        # call's; the generation's counts every call, so that it compares
        # with an autoregressive model's (tokens over the time they took).
        user_callback = kwargs.get("prompt_progress_callback")
        start = time.perf_counter()
        prompt_done = []

        def progress(done, total):
            if done == total and not prompt_done:
                prompt_done.append(time.perf_counter())
            if user_callback is not None:
                user_callback(done, total)

        kwargs["prompt_progress_callback"] = progress
        for response in stream_generate(model, *args, **kwargs):
            now = time.perf_counter()
            t_prompt = (prompt_done[0] if prompt_done else now) - start
            response.prompt_tps = response.prompt_tokens / max(t_prompt, 1e-9)
            t_gen = now - start
            response.generation_tps = response.generation_tokens / max(t_gen, 1e-9)
            yield response

    module.generate_step = deferring_generate_step
    module.stream_generate = timed_stream_generate
    module.speculative_generate_step = refusing_speculative_generate_step
    module.BatchGenerator.__init__ = refusing_batch_init
    module._mlx_lm_llada_patched = True


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError:
        return {}


def _special_token_ids(model_path: Path):
    """Ids of the special tokens named in the checkpoint's tokenizer files."""
    ids = {}
    try:
        with open(model_path / "tokenizer.json", encoding="utf-8") as f:
            for tok in json.load(f).get("added_tokens", []):
                ids[tok["content"]] = tok["id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ids


def _remote_tokenizer(model_path: Path) -> bool:
    """Whether the checkpoint's tokenizer class is its own code (auto_map)."""
    config = _read_json(model_path / "tokenizer_config.json")
    auto_map = config.get("auto_map")
    return isinstance(auto_map, (list, tuple)) or (
        isinstance(auto_map, dict) and "AutoTokenizer" in auto_map
    )


def _register_transformers_config(model_type):
    # Without a registered config class, transformers asks whether to run the
    # checkpoint's remote code (auto_map) before it loads the tokenizer.
    from transformers import AutoConfig, PretrainedConfig

    try:
        AutoConfig.for_model(model_type)
        return
    except ValueError:
        pass

    config_class = type(
        f"{model_type.capitalize()}Config",
        (PretrainedConfig,),
        {"model_type": model_type},
    )
    AutoConfig.register(model_type, config_class)


def _skip_special_text(tokenizer, config):
    # LLaDA's chat.py decodes with skip_special_tokens=True: a special token or
    # an unused vocabulary row inside an answer is not text (mlx-lm prints
    # the first as "<|...|>" and the second as "!").
    tokenmap = getattr(tokenizer._detokenizer, "tokenmap", None)
    if not tokenmap:
        return
    empty = b"" if isinstance(tokenmap[0], bytes) else ""
    for i, token in tokenizer.added_tokens_decoder.items():
        if token.special and i < len(tokenmap):
            tokenmap[i] = empty
    rows = max(config.get("vocab_size") or 0, config.get("embedding_size") or 0)
    tokenmap.extend([empty] * (rows - len(tokenmap)))


def patch_utils(module):
    """Complete diffusion configs from the tokenizer, quietly load tokenizers."""
    if getattr(module, "_mlx_lm_llada_patched", False):
        return
    load_config = module.load_config
    load_tokenizer = module.load_tokenizer
    # A model type that several architectures share (LLaDA, LLaDA-MoE).
    getattr(module, "MODEL_ARCHITECTURE_REMAPPING", {}).update(MODEL_ARCHITECTURES)

    def model_module(config):
        try:
            return sys.modules[module._get_classes(config)[0].__module__]
        except Exception:
            return None

    @functools.wraps(load_config)
    def completing_load_config(model_path, *args, **kwargs):
        config = load_config(model_path, *args, **kwargs)
        if config.get("model_type") not in MODEL_MODULES:
            return config
        # The model module names the special tokens whose ids its config
        # lacks (CONFIG_TOKENS); the tokenizer files have them.
        special = _special_token_ids(Path(model_path))
        names = getattr(model_module(config), "CONFIG_TOKENS", {})
        for key, token in names.items():
            if config.get(key) is None and token in special:
                config[key] = special[token]
        # Diffusion defaults may ship in generation_config.json.
        gen_config = _read_json(Path(model_path) / "generation_config.json")
        if "diffusion_defaults" not in config and "diffusion" in gen_config:
            config["diffusion_defaults"] = gen_config["diffusion"]
        return config

    @functools.wraps(load_tokenizer)
    def quiet_load_tokenizer(model_path, *args, **kwargs):
        try:
            config = module.load_config(Path(model_path))
        except Exception:
            config = {}
        model_type = config.get("model_type")
        if model_type not in MODEL_MODULES:
            return load_tokenizer(model_path, *args, **kwargs)
        _register_transformers_config(model_type)
        defaults = getattr(model_module(config), "TOKENIZER_DEFAULTS", {})
        builtin = defaults.get("tokenizer_type")
        if builtin and _remote_tokenizer(Path(model_path)):
            # The checkpoint's tokenizer is remote code that transformers has
            # built in (Dream's DreamTokenizer is Qwen2's): load that instead.
            args = list(args)
            extra = dict((args.pop(0) if args else None) or {})
            extra.update(kwargs.pop("tokenizer_config_extra", None) or {})
            kwargs["tokenizer_config_extra"] = {"tokenizer_type": builtin, **extra}
        with warnings.catch_warnings():
            # transformers reads config.json for the tokenizer and warns
            # about keys (Dream's rope_scaling: null) that only the model uses.
            warnings.filterwarnings("ignore", message=".*rope_scaling.*deprecated")
            tokenizer = load_tokenizer(model_path, *args, **kwargs)
        # Tokens that also end an answer (TOKENIZER_DEFAULTS["eos_tokens"]).
        vocab = tokenizer.get_vocab()
        for token in defaults.get("eos_tokens", ()):
            if token in vocab:
                tokenizer.add_eos_token(token)
        _skip_special_text(tokenizer, config)
        return tokenizer

    module.load_config = completing_load_config
    module.load_tokenizer = quiet_load_tokenizer
    module._mlx_lm_llada_patched = True


def patch_causal_only(module):
    """Commands that score or train a causal model refuse a diffusion model."""
    if getattr(module, "_mlx_lm_llada_patched", False) or not hasattr(module, "load"):
        return
    load = module.load
    command = module.__name__

    @functools.wraps(load)
    def refusing_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        model = loaded[0]
        if getattr(model, "diffusion", None) is not None:
            raise SystemExit(
                f"{command} assumes a causal (autoregressive) language model; "
                f"{getattr(model, 'model_type', type(model).__name__)} is a "
                "masked-diffusion model, so its numbers would be wrong. "
                "Refusing to run."
            )
        return loaded

    module.load = refusing_load
    module._mlx_lm_llada_patched = True


DIFFUSION_LOSS_NOTE = (
    "masked-diffusion loss: an upper bound on the negative log-likelihood "
    "per token, not a causal perplexity"
)


def patch_lora(module):
    """``mlx_lm.lora`` trains a diffusion model with its own objective.

    mlx-lm's trainer, data formats, LoRA/DoRA/full fine-tuning and adapters
    are unchanged; for a model that declares ``diffusion`` the trainer's
    loss is the masked-diffusion loss (``diffusion/training.py``), and the
    reported losses say what they are. Other models train as before."""
    if getattr(module, "_mlx_lm_llada_patched", False) or not hasattr(module, "train"):
        return
    train, evaluate = module.train, module.evaluate
    evaluate_model = module.evaluate_model

    def with_diffusion_loss(function, args, kwargs):
        """The call's arguments, by name, with the loss of a diffusion model."""
        from .diffusion.training import mlx_lm_loss

        bound = inspect.signature(function).bind_partial(*args, **kwargs).arguments
        diffusion = getattr(bound.get("model"), "diffusion", None) is not None
        if diffusion:
            bound.setdefault("loss", mlx_lm_loss)
        return bound, diffusion

    @functools.wraps(train)
    def diffusion_train(*args, **kwargs):
        bound, diffusion = with_diffusion_loss(train, args, kwargs)
        if diffusion:
            module.rprint(f"Train and validation losses are the {DIFFUSION_LOSS_NOTE}.")
        return train(**bound)

    @functools.wraps(evaluate)
    def diffusion_evaluate(*args, **kwargs):
        return evaluate(**with_diffusion_loss(evaluate, args, kwargs)[0])

    @functools.wraps(evaluate_model)
    def diffusion_evaluate_model(args, model, test_set):
        if getattr(model, "diffusion", None) is None:
            return evaluate_model(args, model, test_set)
        rprint = module.rprint

        def relabel(*texts, **kw):
            text = " ".join(str(t) for t in texts)
            if text.startswith("Test loss"):
                # exp of a bound is no perplexity: report the loss alone.
                text = text.split(",")[0] + f" ({DIFFUSION_LOSS_NOTE})."
            rprint(text, **kw)

        module.rprint = relabel
        try:
            return evaluate_model(args, model, test_set)
        finally:
            module.rprint = rprint

    module.train = diffusion_train
    module.evaluate = diffusion_evaluate
    module.evaluate_model = diffusion_evaluate_model
    module._mlx_lm_llada_patched = True


# The request body's field that carries a diffusion model's settings.
REQUEST_SETTINGS_FIELD = "diffusion"
# The text completion's field (OpenAI's) of the text after the completion.
REQUEST_SUFFIX_FIELD = "suffix"


class _RequestFailed(BaseException):
    # Not an Exception: it must pass the server's catch-all, which answers
    # any failure to start a request with 404.
    def __init__(self, status, error):
        super().__init__(str(error))
        self.status = status


def _request_settings(settings):
    from .diffusion import check_setting_names

    field = f'request\'s "{REQUEST_SETTINGS_FIELD}"'
    if not isinstance(settings, dict):
        raise ValueError(f"The {field} must be an object of settings: {settings!r}")
    check_setting_names(settings, f"the {field}")
    return settings


def _request_template(request, tokenizer, max_tokens):
    """The canvas after the prompt for a request's ``suffix``: a gap of
    ``max_tokens`` masks, then the suffix's tokens; None without a suffix."""
    suffix = getattr(request, "model_suffix", None)
    if suffix is None or suffix == "":
        return None
    field = f'request\'s "{REQUEST_SUFFIX_FIELD}"'
    if request.request_type != "text":
        raise ValueError(
            f"The {field} is for text completions (/v1/completions): a chat "
            "completion has no text after its answer"
        )
    if not isinstance(suffix, str):
        raise ValueError(f"The {field} must be a string: {suffix!r}")
    # As the server encodes the prompt, but the suffix continues the text:
    # no BOS or other special tokens of its own.
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    return [max_tokens, suffix_ids] if suffix_ids else None


def patch_server(module):
    """Serve models that bring their own generation loop.

    The request's ``diffusion`` object reaches the model's loop as settings,
    and a text completion's ``suffix`` as the canvas after the prompt (a gap
    of ``max_tokens`` masks, then the suffix): the answer is the fill alone.
    An error before the first token (a bad setting or suffix, a prompt too
    long for the model) is answered with a status and a JSON error, not a
    dropped connection or a broken stream. Other models are served as before
    (mlx-lm ignores ``suffix``).
    """
    if getattr(module, "_mlx_lm_llada_patched", False):
        return
    serving = threading.local()
    handle_completion = module.APIHandler.handle_completion
    generate = module.ResponseGenerator.generate
    serve_single = module.ResponseGenerator._serve_single
    stream_generate = module.stream_generate

    @functools.wraps(handle_completion)
    def answering_handle_completion(self, request, stop_words):
        request.model_settings = self.body.get(REQUEST_SETTINGS_FIELD)
        request.model_suffix = self.body.get(REQUEST_SUFFIX_FIELD)
        try:
            return handle_completion(self, request, stop_words)
        except _RequestFailed as failure:
            self._set_completion_headers(failure.status)
            self.end_headers()
            self.wfile.write(json.dumps({"error": str(failure)}).encode())
            self.wfile.flush()

    @functools.wraps(generate)
    def starting_generate(self, request, generation_args, progress_callback=None):
        held, started = [], []

        def relay(*progress):
            if not started:
                held.append(progress)
            elif progress_callback is not None:
                progress_callback(*progress)

        ctx, response = generate(self, request, generation_args, relay)
        # The request's model is loaded now (it may be loaded on demand).
        if not has_own_generation(self.model_provider.model):
            started.append(True)
            return ctx, response
        # No header is sent before the first token, so that an error until
        # then gets its own status; the progress reports wait for it too.
        try:
            first = next(response, None)
        except ValueError as e:
            raise _RequestFailed(400, e) from None
        except Exception as e:
            logging.error("The request failed before its first token", exc_info=e)
            raise _RequestFailed(500, e) from None

        def resumed():
            started.append(True)
            for progress in held:
                relay(*progress)
            if first is not None:
                yield first
            yield from response

        return ctx, resumed()

    @functools.wraps(serve_single)
    def serve_single_with_settings(self, request, stream):
        serving.request = request[1]
        try:
            return serve_single(self, request, stream)
        finally:
            serving.request = None

    @functools.wraps(stream_generate)
    def stream_generate_with_settings(model, *args, **kwargs):
        request = getattr(serving, "request", None)
        if request is None or not has_own_generation(model):
            return stream_generate(model, *args, **kwargs)
        settings = getattr(request, "model_settings", None)
        if settings is not None:
            kwargs.update(_request_settings(settings))
        tokenizer = kwargs["tokenizer"] if "tokenizer" in kwargs else args[0]
        template = _request_template(request, tokenizer, kwargs.get("max_tokens"))
        if template is not None:
            kwargs["template"] = template
        return stream_generate(model, *args, **kwargs)

    module.APIHandler.handle_completion = answering_handle_completion
    module.ResponseGenerator.generate = starting_generate
    module.ResponseGenerator._serve_single = serve_single_with_settings
    module.stream_generate = stream_generate_with_settings
    module._mlx_lm_llada_patched = True
