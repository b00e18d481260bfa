#!/usr/bin/env python
# Copyright © 2026 mlx-lm-llada contributors.
"""Train a tiny LLaDA on a checkable instruction task with LLaDA's SFT objective.

The task is an instruction in LLaDA's chat template: by default the user
asks ``"sort 91213517"`` and the assistant answers ``"11123579"`` (6 to 8
digits); ``--task add`` asks ``"12+345="`` for ``"357"``. The answer is
followed by ``<|eot_id|>``, then ``<|endoftext|>`` up to the answer canvas's
length (as LLaDA-Instruct answers). Each step draws its canvas length from
``--answer-lengths``, so that the model answers the same in a 16-token and
in a 256-token canvas (mlx-lm's default ``max_tokens``); a batch holds about
as many tokens as ``--batch-size`` sequences of the shortest canvas.

Training follows LLaDA's SFT recipe: for each sequence a masking ratio
``t ~ U(eps, 1)``; each answer token (EoT and EOS padding included) is masked
with probability ``t``; the prompt stays clean. The loss is the cross-entropy
on the masked tokens weighted by ``1/t``, summed, divided by the answer
length and averaged over the batch: ``diffusion_loss`` of
``mlx_lm_llada.diffusion.training``, the loss ``mlx_lm.lora`` trains with;
the masks are drawn here, from a seeded NumPy generator. Seeds are fixed:
the same command gives the same data, masks and initial weights. ``--init``
starts from a checkpoint that this script wrote (a second training stage);
``training.json`` keeps every stage's command.

The result is a checkpoint in the Hugging Face layout of
``GSAI-ML/LLaDA-8B-Instruct`` (``config.json``, ``generation_config.json``,
``model.safetensors`` in float32 with the HF tensor names, and a tiny
byte-level BPE tokenizer with LLaDA's special tokens and chat template),
plus ``training.json`` (the settings and the log's summary).

Sorting trains within minutes on a CPU; addition (its digits must be aligned
by position, which a small masked model learns slowly) needs far longer.

On the CPU backend, preload OpenBLAS for speed (Debian:
``libopenblas0-pthread``)::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/train_tiny_llada.py
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlx_lm_llada.diffusion.training import diffusion_loss  # noqa: E402
from mlx_lm_llada.models.llada import Model, ModelArgs  # noqa: E402

SPECIAL_TOKENS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
BOS, EOS, MASK, SOH, EOH, EOT = SPECIAL_TOKENS

# The chat template of LLaDA-8B-Instruct (Llama 3's), as the golden
# checkpoints carry it.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

# Whole words of the template, so that a prompt stays short.
MERGED_WORDS = ["user", "assistant", "system", "sort"]

# --------------------------------------------------------------------------
# The tasks: a question (the user message) and its one right answer.


class Addition:
    """``"12+345="`` -> ``"357"``: two numbers of 1..max_digits digits each."""

    name = "add"

    def __init__(self, max_digits=3):
        self.max_digits = max_digits
        self.description = f"addition of two numbers of 1 to {max_digits} digits"

    def sample(self, rng, n):
        ops = []
        for _ in range(2):
            digits = rng.integers(1, self.max_digits + 1, size=n)
            low = np.where(digits == 1, 0, 10 ** (digits - 1))
            ops.append(rng.integers(low, 10**digits))
        return [f"{a}+{b}=" for a, b in zip(*(o.tolist() for o in ops))]

    def answer(self, question):
        a, b = question.rstrip("=").split("+")
        return str(int(a) + int(b))

    def longest(self):
        big = "9" * self.max_digits
        return f"{big}+{big}="

    def widest(self):
        """The question with the longest prompt."""
        return self.longest()


class Sorting:
    """``"sort 5281390"`` -> ``"0123589"``: min_len..max_len random digits."""

    name = "sort"

    def __init__(self, min_len=6, max_len=8):
        self.min_len, self.max_len = min_len, max_len
        self.description = f"sorting a string of {min_len} to {max_len} digits"

    def sample(self, rng, n):
        lengths = rng.integers(self.min_len, self.max_len + 1, size=n)
        return [
            "sort " + "".join(map(str, rng.integers(0, 10, size=k).tolist()))
            for k in lengths.tolist()
        ]

    def answer(self, question):
        return "".join(sorted(question.split()[-1]))

    def longest(self):
        return "sort " + "9" * self.max_len

    def widest(self):
        return self.longest()


class Arithmetic:
    """``"95 mod 7=?"`` -> ``"095, 088, 081, ..., 011, 004. The answer is 4."``.

    The remainder by repeated subtraction, worked as the countdown from
    ``x`` by ``d`` for ``x`` in 10..199 and ``d`` in 2..19, with 1 to
    ``max_ops`` subtractions: every value is the one before less ``d``, and
    the answer ends when the value falls below ``d``. Each value is written
    once: steps that repeated their operand (``95-7=88. 88-7=81.``) let a
    bidirectional model copy each result from the next step instead of
    computing it. Each value takes three digits, so that a digit's place is
    its position (unpadded values trained no faster: 5% of values right
    after 2,000 steps either way). One character is one token; an answer
    takes 26 to 221 tokens.
    """

    name = "arith"
    FINAL = "The answer is {}."

    def __init__(self, max_ops=40):
        self.max_ops = max_ops
        self.description = (
            f"remainders by repeated subtraction (x 10..199, d 2..19, 1 to "
            f"{max_ops} steps), answered with the worked countdown"
        )

    def sample(self, rng, n, max_answer_tokens=None):
        out = []
        while len(out) < n:
            d = int(rng.integers(2, 20))
            xs = self.dividends(d)
            q = f"{int(rng.integers(xs.start, xs.stop))} mod {d}=?"
            if max_answer_tokens is None or len(self.answer(q)) <= max_answer_tokens:
                out.append(q)
        return out

    def dividends(self, d):
        """The x in 10..199 that take 1 to ``max_ops`` steps of ``d``."""
        return range(max(10, d), min(199, (self.max_ops + 1) * d - 1) + 1)

    def problems(self):
        """Every question there is (a few thousand)."""
        return [f"{x} mod {d}=?" for d in range(2, 20) for x in self.dividends(d)]

    def worked(self, question):
        """The countdown of ``question``, from its dividend to its remainder."""
        x, d = map(int, question.rstrip("=?").split(" mod "))
        values = [x]
        while values[-1] >= d:
            values.append(values[-1] - d)
        return values

    def value_spans(self, question):
        """Where each value of the answer lies: (start, end) in characters."""
        n = len(self.worked(question))
        return [(5 * k, 5 * k + 3) for k in range(n)]

    def step_spans(self, question):
        """The answer cut into steps: the first value, each ``", "`` with
        the value after it, then the final sentence and ``<|eot_id|>`` (one
        position past the answer): whether to go on is a step's first token."""
        values = self.value_spans(question)
        last = values[-1][1]
        steps = [values[0]] + [(a - 2, b) for a, b in values[1:]]
        return steps + [(last, len(self.answer(question)) + 1)]

    def answer(self, question):
        values = self.worked(question)
        countdown = ", ".join(f"{v:03d}" for v in values)
        return countdown + ". " + self.FINAL.format(values[-1])

    def final(self, question):
        return str(self.worked(question)[-1])

    def correct(self, text, question):
        """Exact match: the answer text holds ``The answer is <final>.``."""
        return self.FINAL.format(self.final(question)) in text

    def longest(self):
        return max(self.problems(), key=lambda q: len(self.answer(q)))

    def widest(self):
        return max(self.problems(), key=len)

    def fits(self, canvas):
        """Whether the shortest answer and <|eot_id|> fit ``canvas`` tokens."""
        shortest = min(self.problems(), key=lambda q: len(self.answer(q)))
        return len(self.answer(shortest)) + 1 <= canvas


def make_task(name, max_digits=3, min_len=6, max_len=8, max_ops=40):
    if name == "arith":
        return Arithmetic(max_ops)
    if name == "add":
        return Addition(max_digits)
    if name == "sort":
        return Sorting(min_len, max_len)
    raise ValueError(f"unknown task {name!r}")


def heldout_problems(task, n=200, seed=1234):
    """The fixed evaluation set: ``n`` distinct questions, never trained on."""
    rng = np.random.default_rng(seed)
    seen, problems = set(), []
    while len(problems) < n:
        for q in task.sample(rng, n):
            if q not in seen and len(problems) < n:
                seen.add(q)
                problems.append(q)
    return problems


def chat_prompt(text):
    """The chat template applied to one user message (generation prompt on)."""
    return f"{BOS}{SOH}user{EOH}\n\n{text.strip()}{EOT}" f"{SOH}assistant{EOH}\n\n"


def parse_answer(text):
    """The answer text of a decoded canvas: everything before the first end."""
    for end in (EOT, EOS):
        text = text.split(end)[0]
    return text.strip()


# --------------------------------------------------------------------------
# The tokenizer


def bytes_to_unicode():
    """GPT-2's byte to printable-character map (what ByteLevel uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    """A byte-level BPE over printable ASCII (plus tab and newline).

    Every digit is one token; the only merges spell the chat roles. Bytes
    outside ASCII have no token (the vocabulary stays under 128 rows).
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    byte_chars = bytes_to_unicode()
    alphabet = [byte_chars[b] for b in [9, 10] + list(range(32, 127))]
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for word in MERGED_WORDS:
        for i in range(2, len(word) + 1):
            left, right = word[: i - 1], word[i - 1]
            if word[:i] not in vocab:
                merges.append((left, right))
                vocab[word[:i]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=True, use_regex=True
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return tok


def save_tokenizer(tok, out: Path):
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "additional_special_tokens": [MASK, SOH, EOH, EOT],
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


# --------------------------------------------------------------------------
# The checkpoint


def hf_config(args, ids):
    """config.json with every key of LLaDA-8B's (values for this model)."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": args.d_model,
        "embedding_dropout": 0.0,
        "embedding_size": args.embedding_size,
        "eos_token_id": ids[EOS],
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids[MASK],
        "max_sequence_length": args.max_sequence_length,
        "mlp_hidden_size": args.mlp_hidden_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "n_layers": args.n_layers,
        "pad_token_id": ids[EOS],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": args.rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": args.rope_theta,
        "scale_logits": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": args.vocab_size,
        "weight_tying": False,
    }


def save_checkpoint(model, tok, out: Path, block_length):
    out.mkdir(parents=True, exist_ok=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(out / "config.json", hf_config(model.args, ids))
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
            # mlx-lm-llada's defaults for this model (evaluated with them).
            "diffusion": {"block_length": block_length},
            "transformers_version": "4.38.2",
        },
    )
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(mx.float32) for k, v in sorted(weights.items())}
    mx.save_safetensors(
        str(out / "model.safetensors"), weights, metadata={"format": "pt"}
    )
    save_tokenizer(tok, out)


def llama_config(args, ids):
    """config.json of the autoregressive twin: a Hugging Face Llama."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[EOT]],
        "hidden_act": "silu",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "max_position_embeddings": args.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": args.num_attention_heads,
        "num_hidden_layers": args.num_hidden_layers,
        "num_key_value_heads": args.num_key_value_heads,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": args.vocab_size,
    }


def save_autoregressive(model, tok, out: Path):
    """The same-shape Llama in the Hugging Face layout mlx-lm loads."""
    out.mkdir(parents=True, exist_ok=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(out / "config.json", llama_config(model.args, ids))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]},
    )
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(mx.float32) for k, v in sorted(weights.items())}
    mx.save_safetensors(
        str(out / "model.safetensors"), weights, metadata={"format": "pt"}
    )
    save_tokenizer(tok, out)


def save(model, tok, out: Path, args, task, heldout):
    """The checkpoint of either objective; an arithmetic run's held-out set."""
    if args.objective == "autoregressive":
        save_autoregressive(model, tok, out)
    else:
        save_checkpoint(model, tok, out, args.block_length)
    if hasattr(task, "final") and args.objective == "diffusion":
        with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
            for q in heldout:
                f.write(json.dumps({"prompt": q, "answer": task.final(q)}) + "\n")


def model_shape(args):
    """The shape of a model of either objective, as its config.json names it."""
    if hasattr(args, "d_model"):
        return {
            "d_model": args.d_model,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "mlp_hidden_size": args.mlp_hidden_size,
            "vocab_size": args.vocab_size,
            "rope_theta": args.rope_theta,
        }
    return {
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "intermediate_size": args.intermediate_size,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
    }


def load_init(model, path: Path):
    """Load a checkpoint of this script into ``model``; its earlier stages."""
    with open(path / "config.json") as f:
        config = json.load(f)
    mine = model_shape(model.args)
    differ = {k: (config.get(k), v) for k, v in mine.items() if config.get(k) != v}
    if differ:
        raise SystemExit(
            f"--init {path}: its shape differs from this run's: "
            + ", ".join(f"{k} {c} (here {v})" for k, (c, v) in differ.items())
        )
    model.load_weights(str(path / "model.safetensors"))
    training = path / "training.json"
    if not training.exists():
        return []
    with open(training) as f:
        return json.load(f)["stages"]


RESUME = "resume.json"
RESUME_OPTIMIZER = "resume-optimizer.safetensors"


def save_resumable(out: Path, step, optimizer, rng, seconds, argv):
    """What --resume needs beyond the checkpoint: optimizer, data stream, step."""
    state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(out / RESUME_OPTIMIZER), state)
    _write_json(
        out / RESUME,
        {
            "step": step,
            "argv": resume_argv(argv),
            "rng": rng.bit_generator.state,
            "train_seconds": seconds,
        },
    )


def resume_argv(argv):
    """The run's command without the flags that only say when it stops."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-at":
            skip = True
        elif a != "--resume" and not a.startswith("--stop-at="):
            out.append(a)
    return out


def load_resumable(out: Path, model, optimizer, rng, argv):
    """Restore the run saved in ``out``; its step and seconds so far."""
    path = out / RESUME
    if not path.exists():
        raise SystemExit(f"--resume: {path} not found (no stopped run in --out)")
    with open(path) as f:
        saved = json.load(f)
    if saved["argv"] != resume_argv(argv):
        raise SystemExit(
            f"--resume: the run in {out} was started with a different command: "
            + " ".join(saved["argv"])
        )
    model.load_weights(str(out / "model.safetensors"))
    optimizer.state = tree_unflatten(list(mx.load(str(out / RESUME_OPTIMIZER)).items()))
    rng.bit_generator.state = saved["rng"]
    return saved["step"], saved["train_seconds"]


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------
# Data


# A mask unit that cuts the answer as another unit does.
SPANS_OF = {"stop": "step"}


class Batches:
    """Training batches: left-padded prompts, answers padded with EOS."""

    def __init__(
        self, tok, rng, task, answer_lengths, batch_size, exclude, mask_unit="token"
    ):
        self.tok, self.rng, self.task = tok, rng, task
        # One unit, or several: each row then draws one of them.
        units = [mask_unit] if isinstance(mask_unit, str) else list(mask_unit)
        for unit in units:
            spans = SPANS_OF.get(unit, unit)
            if unit != "token" and not hasattr(task, f"{spans}_spans"):
                raise ValueError(f"--mask-unit {unit}: the task has no {spans}s")
        self.mask_units = units
        self.answer_lengths = answer_lengths
        self.exclude = exclude
        self.ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        longest = task.longest()
        self.prompt_length = len(self.encode(chat_prompt(task.widest())))
        # The shortest canvas gets batch_size sequences, the others as many
        # tokens: a step costs about the same whatever its canvas.
        budget = batch_size * (self.prompt_length + min(answer_lengths))
        self.batch_sizes = {
            n: max(1, budget // (self.prompt_length + n)) for n in answer_lengths
        }
        need = len(self.encode(task.answer(longest))) + 1
        # A task with answers of many lengths fills each canvas with what fits.
        self.fitted = hasattr(task, "fits")
        if self.fitted and not task.fits(min(answer_lengths)):
            raise ValueError(
                f"answer length {min(answer_lengths)} is too short for any answer"
            )
        if not self.fitted and need > min(answer_lengths):
            raise ValueError(
                f"answer length {min(answer_lengths)} is too short: the longest "
                f"answer and <|eot_id|> take {need} tokens"
            )

    def next(self):
        """One training batch's problems and answer canvas."""
        lengths = self.answer_lengths
        # A single length draws nothing, so a one-length run keeps its seeds.
        n = lengths[0] if len(lengths) == 1 else int(self.rng.choice(lengths))
        return self.problems(self.batch_sizes[n], n), n

    def make_autoregressive(self, problems):
        """tokens [B, T] (prompt, answer, <|eot_id|>, right-padded with EOS)
        and the positions scored (the answer and <|eot_id|>)."""
        rows = []
        for q in problems:
            prompt = self.encode(chat_prompt(q))
            answer = self.encode(self.task.answer(q)) + [self.ids[EOT]]
            rows.append((prompt, answer))
        # Lengths in steps of 32 (plus the shifted token): few compiled shapes.
        T = -(-max(len(p) + len(a) - 1 for p, a in rows) // 32) * 32 + 1
        tokens = np.full((len(rows), T), self.ids[EOS], dtype=np.int32)
        scored = np.zeros((len(rows), T), dtype=bool)
        for i, (p, a) in enumerate(rows):
            tokens[i, : len(p) + len(a)] = p + a
            scored[i, len(p) : len(p) + len(a)] = True
        return tokens, scored

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def problems(self, n, answer_length=None):
        # The answer and <|eot_id|> fit the canvas.
        fit = dict(max_answer_tokens=answer_length - 1) if self.fitted else {}
        out = []
        while len(out) < n:
            for q in self.task.sample(self.rng, n, **fit):
                if q not in self.exclude and len(out) < n:
                    out.append(q)
        return out

    def make(self, problems, answer_length):
        """tokens [B, T], attention mask [B, T], answer positions [B, T]."""
        B, P, L = len(problems), self.prompt_length, answer_length
        tokens = np.full((B, P + L), self.ids[EOS], dtype=np.int32)
        attn = np.zeros((B, P + L), dtype=np.int32)
        prompts = self.tok.encode_batch(
            [chat_prompt(q) for q in problems],
            add_special_tokens=False,
        )
        for i, (q, enc) in enumerate(zip(problems, prompts)):
            p = enc.ids
            tokens[i, P - len(p) : P] = p
            attn[i, P - len(p) :] = 1
            ans = self.encode(self.task.answer(q)) + [self.ids[EOT]]
            tokens[i, P : P + len(ans)] = ans  # the rest stays EOS
        is_answer = np.zeros((B, P + L), dtype=bool)
        is_answer[:, P:] = True
        return tokens, attn, is_answer

    def noised(self, is_answer, eps, problems=None):
        """LLaDA's forward process on the answer, drawn from this NumPy
        generator (reproducible): which tokens are masked, and each row's
        masking probability ``p`` ([B, 1]). ``noise`` in
        ``mlx_lm_llada.diffusion.training`` draws the same from MLX's.

        With ``mask_unit="value"`` or ``"step"`` (and the rows'
        ``problems``), each value, or each step, of a countdown is masked or
        kept whole, with the same ``p``, as if it were one token;
        ``"stop"`` masks steps so too, and the end padding with the final
        sentence, so that whether to stop is never read off visible padding.
        With several units, each row draws its own."""
        B = is_answer.shape[0]
        t = self.rng.uniform(size=B)
        p = ((1 - eps) * t + eps)[:, None]
        masked = (self.rng.uniform(size=is_answer.shape) < p) & is_answer
        units = self.mask_units
        # A single unit draws nothing, so a one-unit run keeps its seeds.
        if len(units) > 1:
            units = [units[k] for k in self.rng.integers(len(units), size=B)]
        else:
            units = units * B
        P = self.prompt_length
        for i, unit in enumerate(units):
            if unit == "token":
                continue
            spans = getattr(self.task, f"{SPANS_OF.get(unit, unit)}_spans")(problems[i])
            if unit == "stop":
                # Visible end padding would tell where the answer stops.
                spans[-1] = (spans[-1][0], is_answer.shape[1] - P)
            whole = self.rng.uniform(size=len(spans)) < p[i, 0]
            for (a, b), m in zip(spans, whole):
                masked[i, P + a : P + b] = m
        return masked, p.astype(np.float32)


# --------------------------------------------------------------------------
# Evaluation during training


def is_correct(task, text, question):
    """Exact match of a decoded answer (everything before its first end)."""
    if hasattr(task, "correct"):
        return task.correct(parse_answer(text), question)
    return parse_answer(text) == task.answer(question)


def accuracy(
    model,
    tok,
    task,
    problems,
    answer_length,
    block_length,
    batch_size=100,
    threshold=None,
):
    """Exact match with the reference schedule (one token per step), or
    with ``threshold`` and the dual cache (a quicker check in training)."""
    from mlx_lm_llada import diffusion_generate

    fast = {}
    if threshold is not None:
        fast = dict(threshold=threshold, cache="dual", early_stop=True)
    right = 0
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        prompt, mask = left_padded(tok, chunk, ids[EOS])
        out, _ = diffusion_generate(
            model,
            mx.array(prompt),
            attention_mask=mx.array(mask),
            steps=answer_length,
            gen_length=answer_length,
            block_length=block_length,
            **fast,
        )
        out = np.array(out)[:, prompt.shape[1] :]
        for q, row in zip(chunk, out):
            text = tok.decode(row.tolist(), skip_special_tokens=False)
            right += is_correct(task, text, q)
    return right / len(problems)


def accuracy_autoregressive(model, tok, task, problems, max_tokens):
    """Exact match of greedy decoding (mlx-lm's ``generate_step``)."""
    from mlx_lm.generate import generate_step

    ends = {tok.token_to_id(EOS), tok.token_to_id(EOT)}
    right = 0
    for q in problems:
        prompt = mx.array(tok.encode(chat_prompt(q), add_special_tokens=False).ids)
        out = []
        for token, _ in generate_step(prompt, model, max_tokens=max_tokens):
            if int(token) in ends:
                break
            out.append(int(token))
        right += is_correct(task, tok.decode(out), q)
    return right / len(problems)


def left_padded(tok, questions, pad_id):
    """Chat prompts as a left-padded batch and its attention mask."""
    encs = [tok.encode(chat_prompt(q), add_special_tokens=False).ids for q in questions]
    P = max(map(len, encs))
    prompt = np.full((len(encs), P), pad_id, dtype=np.int32)
    mask = np.zeros((len(encs), P), dtype=np.int32)
    for i, e in enumerate(encs):
        prompt[i, P - len(e) :] = e
        mask[i, P - len(e) :] = 1
    return prompt, mask


# --------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " Saves a Hugging Face LLaDA checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        default="tests/fixtures/trained-sorter",
        help="checkpoint folder (relative to the repository root)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="sequences of the shortest canvas; longer ones take as many tokens",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=1e-3, help="t ~ U(eps, 1)")
    p.add_argument("--task", choices=["sort", "add", "arith"], default="sort")
    p.add_argument("--max-ops", type=int, default=40, help="arith: most steps")
    p.add_argument(
        "--mask-unit",
        choices=["token", "value", "step", "stop"],
        nargs="+",
        default=["token"],
        help="value (arith): mask each countdown value's three digits together, "
        "as if a value were one token; step: each ', ' with the value after it, "
        "and the final sentence, together; stop: as step, with the end padding "
        "masked with the final sentence; several: each row draws one",
    )
    p.add_argument(
        "--objective",
        choices=["diffusion", "autoregressive"],
        default="diffusion",
        help="autoregressive trains mlx-lm's Llama of the same shape on the "
        "same problems, steps and schedule (the baseline to compare with)",
    )
    p.add_argument(
        "--eval-threshold",
        type=float,
        help="evaluate during training with this threshold and the dual cache "
        "(default: the reference schedule)",
    )
    p.add_argument("--max-digits", type=int, default=3, help="add: digits per operand")
    p.add_argument("--min-len", type=int, default=6, help="sort: shortest string")
    p.add_argument("--max-len", type=int, default=8, help="sort: longest string")
    p.add_argument(
        "--answer-lengths",
        type=int,
        nargs="+",
        default=[16],
        help="answer canvases (the answer, <|eot_id|>, then <|endoftext|> "
        "padding); each step draws one",
    )
    p.add_argument(
        "--block-length",
        type=int,
        default=8,
        help="block length written to generation_config.json and used in evals",
    )
    p.add_argument(
        "--eval-length",
        type=int,
        help="canvas of the held-out evaluation (default: the longest answer length)",
    )
    p.add_argument(
        "--init",
        help="start from this checkpoint (written by this script, same shape)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that stopped in --out (the same command): its "
        "weights, optimizer, data stream and step, saved at each evaluation",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        help="stop after this step (an evaluation step), resumable with --resume",
    )
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=256)
    p.add_argument("--vocab-rows", type=int, default=128)
    p.add_argument(
        "--rope-theta",
        type=float,
        default=500000.0,
        help="RoPE base (LLaDA-8B's by default; a narrow head resolves positions "
        "better with a smaller one)",
    )
    p.add_argument("--heldout", type=int, default=200, help="problems never trained on")
    p.add_argument("--heldout-seed", type=int, default=1234)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def diffusion_args(args, ids):
    """The LLaDA of this run's shape, with the tokenizer's special ids."""
    return ModelArgs(
        model_type="llada",
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_kv_heads=args.n_heads,
        n_layers=args.n_layers,
        mlp_hidden_size=args.mlp_hidden,
        vocab_size=args.vocab_rows,
        embedding_size=args.vocab_rows,
        mask_token_id=ids[MASK],
        eos_token_id=ids[EOS],
        eot_token_id=ids[EOT],
        bos_token_id=ids[BOS],
        rope_theta=args.rope_theta,
        max_sequence_length=4096,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.stop_at is not None and (
        not 0 < args.stop_at < args.steps or args.stop_at % args.eval_every
    ):
        raise SystemExit(
            f"--stop-at {args.stop_at}: not an evaluation step (a multiple of "
            f"--eval-every {args.eval_every}) before --steps {args.steps}"
        )
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out

    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if tok.get_vocab_size() > args.vocab_rows:
        raise SystemExit(f"{tok.get_vocab_size()} tokens > {args.vocab_rows} rows")
    autoregressive = args.objective == "autoregressive"
    if autoregressive:
        from mlx_lm.models import llama

        model = llama.Model(
            llama.ModelArgs(
                model_type="llama",
                hidden_size=args.d_model,
                num_hidden_layers=args.n_layers,
                intermediate_size=args.mlp_hidden,
                num_attention_heads=args.n_heads,
                num_key_value_heads=args.n_heads,
                rms_norm_eps=1e-5,
                vocab_size=args.vocab_rows,
                rope_theta=args.rope_theta,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            )
        )
    else:
        model = Model(diffusion_args(args, ids))
    stages = []
    if args.init:
        init = Path(args.init)
        if not init.is_absolute():
            init = ROOT / init
        stages = load_init(model, init)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))

    task = make_task(
        args.task, args.max_digits, args.min_len, args.max_len, args.max_ops
    )
    heldout = heldout_problems(task, args.heldout, args.heldout_seed)
    lengths = sorted(set(args.answer_lengths))
    data = Batches(
        tok, rng, task, lengths, args.batch_size, set(heldout), args.mask_unit
    )
    eval_length = args.eval_length or lengths[-1]
    print(
        f"tokenizer {tok.get_vocab_size()} tokens, {args.vocab_rows} rows; "
        f"model {n_params:,} parameters; prompt {data.prompt_length} tokens; "
        "answer canvas (batch): "
        + ", ".join(f"{n} ({data.batch_sizes[n]})" for n in lengths),
        flush=True,
    )

    decay = max(1, args.steps - args.warmup)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(args.lr / args.warmup, args.lr, args.warmup),
            optim.cosine_decay(args.lr, decay, args.min_lr),
        ],
        [args.warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)

    def masked_diffusion_loss(model, tokens, scored, masked, p, attn):
        # The package's objective (what mlx_lm.lora trains with): CE on the
        # masked tokens / p / answer length, summed, / batch.
        loss, _ = diffusion_loss(model, tokens, scored, masked, p, attn)
        return loss

    def autoregressive_loss(model, tokens, scored, *_):
        # Next-token CE on the answer and <|eot_id|>, mean over those tokens.
        logits = model(tokens[:, :-1])
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:])
        weights = scored[:, 1:]
        return (ce * weights).sum() / weights.sum()

    loss_fn = autoregressive_loss if autoregressive else masked_diffusion_loss

    def train_step(tokens, scored, masked, p, attn):
        loss, grads = nn.value_and_grad(model, loss_fn)(
            model, tokens, scored, masked, p, attn
        )
        grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        return loss

    argv = argv if argv is not None else sys.argv[1:]
    done, seconds_before = 0, 0.0
    if args.resume:
        done, seconds_before = load_resumable(out, model, optimizer, rng, argv)
        if done >= args.steps:
            raise SystemExit(f"--resume: the run in {out} has done its {done} steps")
        print(f"resumed at step {done}", flush=True)
    state = [model.state, optimizer.state]
    train_step = mx.compile(train_step, inputs=state, outputs=state)

    def write_training(step, seconds, acc, how):
        # At every save: a stopped run's checkpoint tells how far its stage went.
        stage = {
            "command": " ".join(
                ["python benchmarks/train_tiny_llada.py"] + resume_argv(argv)
            ),
            "steps": args.steps,
            "steps_done": step,
            "answer_lengths": lengths,
            "mask_unit": " ".join(args.mask_unit),
            "batch_sizes": {str(n): data.batch_sizes[n] for n in lengths},
            "train_seconds": round(seconds, 1),
            "heldout_accuracy": acc,
            "evaluated_with": how,
            "eval_length": eval_length,
        }
        _write_json(
            out / "training.json",
            {
                "task": task.description,
                "objective": (
                    "next-token CE on the answer and <|eot_id|>, mean over them"
                    if autoregressive
                    else "LLaDA SFT: t~U(eps,1), answer tokens (or each stage's "
                    "mask_unit) masked with prob t, CE on masked / t, / answer "
                    "length, mean over batch"
                ),
                "parameters": n_params,
                "train_seconds": round(
                    sum(s["train_seconds"] for s in stages) + seconds, 1
                ),
                "final_heldout_accuracy": acc,
                "final_evaluated_with": how,
                "args": vars(args),
                "stages": stages + [stage],
            },
        )

    eval_set = heldout[: args.eval_problems]
    start, running = time.time() - seconds_before, []
    for step in range(done + 1, args.steps + 1):
        problems, n = data.next()
        tokens, attn, is_answer = data.make(problems, n)
        # Drawn for both objectives, so that both see the same problems.
        masked, p = data.noised(is_answer, args.eps, problems)
        if autoregressive:
            tokens, is_answer = data.make_autoregressive(problems)
        loss = train_step(
            mx.array(tokens),
            mx.array(is_answer),
            mx.array(masked),
            mx.array(p),
            mx.array(attn),
        )
        mx.eval(state, loss)
        running.append(loss.item())
        if step % args.log_every == 0:
            print(
                f"step {step:5d}  loss {np.mean(running):.4f}  "
                f"lr {optimizer.learning_rate.item():.2e}  "
                f"{time.time() - start:7.1f} s",
                flush=True,
            )
            running = []
        if step % args.eval_every == 0 or step == args.steps:
            if autoregressive:
                acc = accuracy_autoregressive(model, tok, task, eval_set, eval_length)
                how = f"greedy, at most {eval_length} tokens"
            else:
                acc = accuracy(
                    model,
                    tok,
                    task,
                    eval_set,
                    eval_length,
                    args.block_length,
                    threshold=args.eval_threshold,
                )
                how = f"canvas {eval_length}, block {args.block_length}"
                if args.eval_threshold is not None:
                    how += f", threshold {args.eval_threshold} + dual cache"
            print(f"step {step:5d}  held-out exact match {acc:.3f} ({how})", flush=True)
            save(model, tok, out, args, task, heldout)
            seconds = time.time() - start
            write_training(step, seconds, acc, how)
            if step < args.steps:
                save_resumable(out, step, optimizer, rng, seconds, argv)
            if step == args.stop_at:
                print(f"stopped at step {step}: --resume continues", flush=True)
                return

    # The last step was an evaluation: saved above. Nothing to resume.
    train_time = time.time() - start
    for name in (RESUME, RESUME_OPTIMIZER):
        (out / name).unlink(missing_ok=True)
    print(f"saved {out} after {train_time:.0f} s", flush=True)


if __name__ == "__main__":
    main()
