"""``mlx_lm.lora`` on diffusion models: the masked-diffusion objective
(``diffusion/training.py``) against LLaDA's formula in NumPy, mlx-lm's
trainer, data formats, fine-tune types, adapters and fusing on a trained
LLaDA, and an autoregressive model's training left as it was."""

import json
import random
import re

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import FIXTURES, command_env, generated_text, load_golden, run_command
from mlx_lm import stream_generate
from test_chat_terminal import make_autoregressive_model
from test_visualize import ANSI

from mlx_lm_llada.diffusion import training
from mlx_lm_llada.diffusion.training import EPS, diffusion_loss, mlx_lm_loss, noise
from mlx_lm_llada.mlx_lm_patches import DIFFUSION_LOSS_NOTE

SORTER = FIXTURES / "trained-sorter"
NOTE = f"Train and validation losses are the {DIFFUSION_LOSS_NOTE}."

# The objective against LLaDA's (NumPy) ------------------------------------


def cross_entropy(logits, tokens):
    """Each token's cross-entropy under ``logits`` (float64)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]


def model_ce(model, tokens, masked):
    """The cross-entropy of every token, from the model's logits on ``tokens``
    with ``masked`` replaced by the mask token. Dream (shifted logits) reads
    token i from the logits at i - 1, token 0 from its own."""
    spec = model.diffusion
    noisy = np.where(masked, spec.mask_token_id, tokens)
    logits = np.array(model(mx.array(noisy)).astype(mx.float32))
    if spec.logits_shift:
        source = np.maximum(np.arange(tokens.shape[1]) - 1, 0)
        logits = logits[:, source]
    return cross_entropy(logits, tokens)


def llada_sft_loss(ce, masked, p, prompt_lengths):
    """LLaDA's SFT loss (its GUIDELINES.md): each masked answer token's CE
    over p and over its row's answer length (the end padding included),
    summed, over the batch size."""
    B, L = masked.shape
    answer_lengths = np.repeat((L - prompt_lengths)[:, None], L, axis=1)
    p_mask = np.repeat(p, L, axis=1)
    token_loss = ce[masked] / p_mask[masked]
    return np.sum(token_loss / answer_lengths[masked]) / B


def llada_pretraining_loss(ce, masked, p):
    """LLaDA's pre-training loss: the masked tokens' CE over p, summed, over
    batch size times length."""
    B, L = masked.shape
    return np.sum(ce[masked] / np.repeat(p, L, axis=1)[masked]) / (B * L)


def random_rows(spec, prompt_lengths, L=24, seed=0):
    """Tokens [B, L]: random prompt and answer tokens, each row ending in a
    run of end-token padding; a fixed mask of answer tokens (some of each
    row) and each row's p."""
    rng = np.random.default_rng(seed)
    B = len(prompt_lengths)
    tokens = rng.integers(0, 300, size=(B, L))
    tokens[:, -5:] = spec.end_token_ids[0]
    p = np.array([[0.2], [0.55], [0.9]])[:B]
    answer = np.arange(L)[None] >= prompt_lengths[:, None]
    masked = (rng.random((B, L)) < p) & answer
    masked[np.arange(B), prompt_lengths] = True  # (Dream: token 0 unshifted)
    masked[:, -1] = True  # end padding is part of the answer
    return tokens, masked, p, answer


LOSS_MODELS = [("llada", "tiny-mha"), ("llada", "tiny-gqa"), ("dream", "tiny-mha")]


@pytest.mark.parametrize("family, name", LOSS_MODELS)
@pytest.mark.parametrize("form", ["sft", "pretraining"])
def test_loss_is_lladas_formula(family, name, form):
    model, _ = load_golden(name, family)
    assert model.diffusion.logits_shift == (family == "dream")
    prompts = np.array([4, 9, 1] if form == "sft" else [0, 0, 0])
    tokens, masked, p, scored = random_rows(model.diffusion, prompts)
    loss, n = diffusion_loss(
        model,
        mx.array(tokens),
        mx.array(scored),
        mx.array(masked),
        mx.array(p, dtype=mx.float32),
    )
    ce = model_ce(model, tokens, masked)
    if form == "sft":
        expected = llada_sft_loss(ce, masked, p, prompts)
    else:
        expected = llada_pretraining_loss(ce, masked, p)
        assert expected == pytest.approx(llada_sft_loss(ce, masked, p, prompts))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert n.item() == scored.sum()


def test_noise_masks_scored_tokens_and_follows_the_seed():
    offsets = mx.array([[0], [5], [100], [256]])
    scored = mx.arange(256)[None] >= offsets
    draws = []
    for seed in (3, 3, 4):
        mx.random.seed(seed)
        draws.append(noise(scored))
    (m1, p1), (m2, p2), (m3, p3) = draws
    assert mx.array_equal(m1, m2) and mx.array_equal(p1, p2)
    assert not mx.array_equal(m1, m3)
    for masked, p in draws:
        assert not (masked & ~scored).any().item()
        assert p.shape == (4, 1) and ((p >= EPS) & (p <= 1)).all().item()
    # p = (1 - eps) t + eps; all of a row at t = 1, about p of it otherwise.
    masked, p = noise(scored, t=mx.array([1.0, 0.5, 0.0, 0.5]))
    assert np.allclose(np.array(p[:, 0]), [1.0, 0.5 + EPS / 2, EPS, 0.5 + EPS / 2])
    assert mx.array_equal(masked[0], scored[0])
    assert 0.3 < masked[1].sum().item() / scored[1].sum().item() < 0.7
    assert not masked[3].any().item()  # nothing scored


@pytest.fixture(scope="module")
def sorter():
    return mlx_lm.load(str(SORTER))


def chat(question, answer):
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


@pytest.mark.parametrize("form", ["sft", "pretraining"])
def test_mlx_lm_loss_on_a_padded_batch(sorter, form, monkeypatch):
    """A batch as mlx-lm's iterate_batches makes it: rows padded with zeros,
    ``lengths`` rows (offset, length). The padding becomes the end token and
    is scored; an answer ends at its last end of turn (the header LLaDA's
    template writes after it becomes padding); the prompt is never masked."""
    model, tokenizer = sorter
    spec = model.diffusion
    eos, eot = spec.eos_token_id, spec.eot_token_id
    rows, offsets, ends = [], [], []
    for question, answer in [("sort 4646", "6644"), ("sort 91", "91")]:
        messages = chat(question, answer)
        ids = tokenizer.apply_chat_template(messages, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            messages[:1], add_generation_prompt=True, return_dict=False
        )
        end = len(prompt) + len(answer) + 1  # the answer and its end of turn
        assert ids[len(prompt) : end] == tokenizer.encode(answer) + [eot]
        assert len(ids) > end  # the template writes on after the answer
        rows.append(ids)
        offsets.append(len(prompt) if form == "sft" else 0)
        ends.append(end)
    if form == "pretraining":  # a plain text row as well (mlx-lm adds EOS)
        rows.append(tokenizer.encode("sort 4646 6644") + [eos])
        offsets.append(0)
        ends.append(len(rows[-1]))
    L = 33
    batch = np.zeros((len(rows), L), np.int32)
    for i, ids in enumerate(rows):
        batch[i, : len(ids)] = ids
    lengths = mx.array([[o, len(ids)] for o, ids in zip(offsets, rows)])
    expected = np.full_like(batch, eos)
    for i, end in enumerate(ends):
        expected[i, :end] = batch[i, :end]
    expected_scored = np.arange(L)[None] >= np.array(offsets)[:, None]

    calls = []

    def spy(model, tokens, scored, masked, p, attention_mask=None):
        calls.append((tokens, scored, masked, p))
        return diffusion_loss(model, tokens, scored, masked, p, attention_mask)

    monkeypatch.setattr(training, "diffusion_loss", spy)
    results = []
    for _ in range(2):
        mx.random.seed(11)
        results.append(mlx_lm_loss(model, mx.array(batch), lengths))
    (loss, n), (again, _) = results
    assert loss.item() == again.item()  # the same seed, the same masks

    tokens, scored, masked, p = (np.array(a) for a in calls[0])
    assert (tokens == expected).all()
    assert (scored == expected_scored).all() and n.item() == scored.sum()
    assert not (masked & ~scored).any() and masked.any()
    assert len(set(p[:, 0])) == len(rows)  # a t drawn for each row
    ce = model_ce(model, tokens, masked)
    reference = llada_sft_loss(ce, masked, p, np.array(offsets))
    if form == "pretraining":
        reference = llada_pretraining_loss(ce, masked, p)
    assert loss.item() == pytest.approx(reference, rel=1e-5)


# mlx_lm.lora as a command ---------------------------------------------------

# Every run: the whole model (-1 layers), batches of 4, all validation rows;
# a learning rate this tiny model takes (1e-3 collapses it to end tokens).
LORA_ARGS = ["--num-layers", "-1", "--batch-size", "4", "--learning-rate", "1e-4"]
LORA_ARGS += ["--val-batches", "-1"]

RECORDS = {
    "text": lambda q, a: {"text": f"{q} {a}"},
    "completions": lambda q, a: {"prompt": q, "completion": a},
    "chat": lambda q, a: {"messages": chat(q, a)},
}


def sort_problem(rng):
    """A question of 6 digits and the digits sorted in reverse: the sorter's
    answers reversed, a target it learns in a few steps. A chat row is 32
    tokens, so batches are 33 wide."""
    digits = "".join(rng.choice("0123456789") for _ in range(6))
    return f"sort {digits}", "".join(sorted(digits, reverse=True))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same problems in each of mlx-lm's formats: a folder each, with
    train (16), valid (16) and test (4) jsonl."""
    folders = {}
    for fmt, record in RECORDS.items():
        folders[fmt] = tmp_path_factory.mktemp(fmt)
        rng = random.Random(0)
        for split, n in (("train", 16), ("valid", 16), ("test", 4)):
            lines = [json.dumps(record(*sort_problem(rng))) for _ in range(n)]
            (folders[fmt] / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folders


def lora(data, adapters, *args, model=SORTER, env=None):
    """``mlx_lm.lora --train`` (``args`` after, and over, ``LORA_ARGS``): its
    stdout, less the terminal styles."""
    command = ["--model", model, "--train", "--data", data, "--adapter-path", adapters]
    out = run_command("mlx_lm.lora", *command, *LORA_ARGS, *args, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return ANSI.sub("", out.stdout)


def reports(stdout):
    """The (iteration, loss) of each validation and training report, as
    printed."""
    val = re.findall(r"^ *(\d+) +val (\S+) ", stdout, re.M)
    train = re.findall(r"^ *(\d+) +(\S+) [▼▲] ", stdout, re.M)
    return {"val": val, "train": train}


def floats(pairs):
    return [float(loss) for _, loss in pairs]


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """The sorter, LoRA-trained on the chat data for 20 steps, then tested:
    the run's stdout and its adapter folder."""
    adapters = tmp_path_factory.mktemp("adapters")
    args = ["--mask-prompt", "--iters", "20", "--steps-per-eval", "20", "--test"]
    return lora(datasets["chat"], adapters, *args), adapters


def test_chat_training_lowers_the_diffusion_loss(trained):
    stdout, adapters = trained
    assert NOTE in stdout
    got = reports(stdout)
    assert [it for it, _ in got["val"]] == ["1", "20"]
    assert [it for it, _ in got["train"]] == ["10", "20"]
    first, last = floats(got["val"])
    assert last < first
    assert all(np.isfinite(floats(got["train"])))
    # --test: the loss with what it is, and no perplexity (exp of a bound).
    test = re.findall(r"^Test loss \d+\.\d+ \((.*)\)\.$", stdout, re.M)
    assert test == [DIFFUSION_LOSS_NOTE]
    assert "ppl" not in stdout
    assert (adapters / "adapters.safetensors").exists()


def test_text_format_trains(datasets, tmp_path):
    # The pre-training form: every token of a row scored, end padding too.
    args = ["--iters", "20", "--steps-per-eval", "20"]
    stdout = lora(datasets["text"], tmp_path, *args)
    assert NOTE in stdout
    val = reports(stdout)["val"]
    assert [it for it, _ in val] == ["1", "20"]
    first, last = floats(val)
    assert last < first


def test_completions_format_and_grad_checkpoint(datasets, trained, tmp_path):
    # Completions (prompt masked) are the chat rows: the same first
    # validation loss as the chat run; gradient checkpointing changes no
    # number of a run on those rows.
    args = ["--mask-prompt", "--iters", "2", "--steps-per-eval", "2"]
    completions = lora(datasets["completions"], tmp_path / "c", *args)
    checkpointed = lora(datasets["chat"], tmp_path / "g", *args, "--grad-checkpoint")
    assert NOTE in completions and NOTE in checkpointed
    got = reports(completions)
    assert [it for it, _ in got["val"]] == ["1", "2"]
    assert got["val"][0] == reports(trained[0])["val"][0]
    assert reports(checkpointed) == got


@pytest.mark.parametrize("fine_tune_type", ["dora", "full"])
def test_fine_tune_types(datasets, tmp_path, fine_tune_type):
    args = ["--mask-prompt", "--iters", "2", "--steps-per-eval", "2"]
    args += ["--fine-tune-type", fine_tune_type]
    stdout = lora(datasets["chat"], tmp_path, *args)
    assert NOTE in stdout
    got = reports(stdout)
    assert [it for it, _ in got["val"]] == ["1", "2"]
    assert all(np.isfinite(floats(got["val"] + got["train"])))
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    if fine_tune_type == "dora":
        assert any(k.endswith(".m") for k in saved)  # DoRA's magnitudes
    else:
        assert saved and not any("lora" in k for k in saved)


# Adapters in generation and fusing --------------------------------------------

QUESTION = "sort 46465691"
GENERATE = ["--prompt", QUESTION, "--max-tokens", "16"]
REFERENCE = {"reference": 1}  # LLaDA's reference sampler: no threshold


def in_process_answer(model, tokenizer, **settings):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    responses = stream_generate(model, tokenizer, prompt, max_tokens=16, **settings)
    return "".join(r.text for r in responses)


def test_adapter_generates_and_fuses(trained, sorter, tmp_path):
    adapters = trained[1]
    out = run_command(
        "mlx_lm.generate",
        *["--model", SORTER, "--adapter-path", adapters, *GENERATE],
        settings=REFERENCE,
    )
    assert out.returncode == 0, out.stderr
    adapted = generated_text(out.stdout)
    model, tokenizer = mlx_lm.load(str(SORTER), adapter_path=str(adapters))
    assert adapted == in_process_answer(model, tokenizer, reference=True)
    # The adapter changes the answer (it was trained towards reversed ones).
    assert adapted != in_process_answer(*sorter, reference=True)

    fused = tmp_path / "fused"
    out = run_command(
        "mlx_lm.fuse",
        *["--model", SORTER, "--adapter-path", adapters, "--save-path", fused],
    )
    assert out.returncode == 0, out.stderr
    out = run_command(
        "mlx_lm.generate", "--model", fused, *GENERATE, settings=REFERENCE
    )
    assert out.returncode == 0, out.stderr
    assert generated_text(out.stdout) == adapted


# An autoregressive model trains as without this package ----------------------


def test_autoregressive_training_is_unchanged(datasets, tmp_path):
    llama = make_autoregressive_model(tmp_path / "tiny-llama")
    args = ["--mask-prompt", "--iters", "4", "--steps-per-eval", "2"]
    args += ["--steps-per-report", "2", "--test", "--seed", "3"]
    runs = {}
    for disable in ("0", "1"):
        env = command_env(MLX_LM_LLADA_DISABLE=disable)
        adapters = tmp_path / f"adapters-{disable}"
        stdout = lora(datasets["chat"], adapters, *args, model=llama, env=env)
        test = re.findall(r"^Test loss .*$", stdout, re.M)
        weights = mx.load(str(adapters / "adapters.safetensors"))
        runs[disable] = reports(stdout), test, weights, NOTE in stdout
    (ours, test, weights, note), (plain, plain_test, plain_weights, _) = runs.values()
    assert not note
    assert len(ours["val"]) == 3 and len(ours["train"]) == 2
    assert ours == plain
    assert len(test) == 1 and "ppl" in test[0] and test == plain_test
    assert weights.keys() == plain_weights.keys()
    assert all(mx.array_equal(weights[k], plain_weights[k]) for k in weights)
