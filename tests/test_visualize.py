"""Watch the canvas fill: the step callback, the live view and the traces
(``--visualize``, ``--trace``, ``--trace-html``)."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pexpect
import pytest
from conftest import GOLDEN, load_golden

from mlx_lm_llada import diffusion_generate
from mlx_lm_llada.visualize import (
    MASK_GLYPH,
    SHOW_CURSOR,
    CanvasView,
    TraceRecorder,
    display_piece,
    read_trace,
    replay,
)

MASK = 482  # cases.json special_token_ids
ESCAPE = "\x1b"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A model whose random text is mostly printable, and the command line for it.
MODEL = "tiny-gqa"
PROMPT = "hello"
ARGS = ["--model", str(GOLDEN / MODEL), "--prompt", PROMPT, "--max-tokens", "32"]
ARGS += ["--block-length", "16"]
CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
    None,
)


def command(name):
    """Our installed command, or the module run by this interpreter."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", name]


def command_env():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLX_LM_LLADA_") or k == "MLX_LM_LLADA_DISABLE"
    }
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# The step callback --------------------------------------------------------

SETTINGS = {
    "fixed": ("tiny-mha", dict(steps=32, gen_length=32, block_length=16)),
    "prefix": (
        "tiny-mha",
        dict(steps=16, gen_length=32, block_length=8, cache="prefix"),
    ),
    "threshold-dual": (
        "tiny-sharp",
        dict(gen_length=32, block_length=16, threshold=0.5, cache="dual"),
    ),
    "factor": ("tiny-sharp", dict(gen_length=32, block_length=32, factor=1.0)),
    "early-stop": (
        "tiny-eos",
        dict(steps=32, gen_length=32, block_length=16, early_stop=True),
    ),
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name,kwargs", SETTINGS.values(), ids=SETTINGS.keys())
def test_callback_sees_every_commit_once(name, kwargs, batch):
    model, tokenizer = load_golden(name)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}],
        add_generation_prompt=True,
    )
    P, G, L = len(prompt), kwargs["gen_length"], kwargs["block_length"]
    seen = np.zeros((batch, P + G), dtype=int)
    canvas = np.full((batch, P + G), MASK)
    canvas[:, :P] = prompt
    steps = []
    trace = TraceRecorder(spec=model.diffusion, row=batch - 1)

    def on_step(st):
        steps.append(st)
        trace(st)
        assert st.block_start == P + st.block * L and st.block_length == L
        now = st.canvas
        for row in range(batch):
            pos = st.committed[row]
            assert len(st.confidence[row]) == len(pos)
            assert np.all(np.isfinite(st.confidence[row]))
            assert np.all((pos >= st.block_start) & (pos < st.block_start + L))
            assert np.all(canvas[row, pos] == MASK) and np.all(now[row, pos] != MASK)
            seen[row, pos] += 1
            changed = np.flatnonzero(now[row] != canvas[row])
            if st.done:
                # The early stop's end padding is the only other change.
                padding = np.setdiff1d(changed, pos)
                assert np.isin(now[row, padding], model.diffusion.end_token_ids).all()
                seen[row, padding] += 1
            else:
                assert set(changed) == set(pos)
        canvas[:] = now

    tokens, nfe = diffusion_generate(
        model, mx.array([prompt] * batch), on_step=on_step, **kwargs
    )
    trace.finish()
    tokens = np.array(tokens)
    assert nfe == len(steps) == steps[-1].nfe
    assert np.array_equal(steps[-1].canvas, tokens)
    assert (seen[:, :P] == 0).all() and (seen[:, P:] == 1).all()
    assert replay(trace.records) == tokens[batch - 1].tolist()
    if kwargs.get("early_stop"):
        assert steps[-1].done and len(steps) < 32
        assert "filled" in trace.records[-2]  # the padding, replayed too


# The live view in Python --------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_display_piece():
    assert display_piece("a\nb\tc") == "a↵b␉c"
    assert display_piece("") == "\ufffd"
    assert display_piece("\x7f\x85") == "␡\ufffd"


def test_view_frames_fit_the_terminal(monkeypatch):
    monkeypatch.setattr(
        shutil, "get_terminal_size", lambda *a: os.terminal_size((30, 6))
    )
    model, tokenizer = load_golden("tiny-sharp")
    out = FakeTerminal()
    view = CanvasView(tokenizer, model.diffusion, out=out, fps=1e9)
    diffusion_generate(
        model,
        mx.array([tokenizer.encode("hello")]),
        steps=64,
        gen_length=64,
        block_length=16,
        on_step=view,
    )
    view.finish()
    text = out.getvalue()
    assert MASK_GLYPH in text and text.endswith(SHOW_CURSOR)
    frames = text.split("\x1b[J")
    assert len(frames) == 65  # a frame per step (fps is unbounded), the last
    for frame in frames:
        lines = ANSI.sub("", frame).strip("\r\n").split("\n")
        assert len(lines) <= 5  # the terminal's lines, less one
        assert all(len(line) < 30 for line in lines[:-1])
    assert "canvas: 64/64 tokens" in ANSI.sub("", frames[-1])


def test_view_without_terminal_prints_a_plain_line():
    model, tokenizer = load_golden("tiny-sharp")
    out = io.StringIO()
    view = CanvasView(tokenizer, model.diffusion, out=out)
    diffusion_generate(
        model,
        mx.array([tokenizer.encode("hello")]),
        steps=16,
        gen_length=16,
        block_length=16,
        on_step=view,
    )
    view.finish()
    assert re.fullmatch(r"canvas: 16/16 tokens · 1/1 blocks .*\n", out.getvalue())


# Our commands -------------------------------------------------------------


@pytest.fixture(scope="module")
def expected():
    """What mlx-lm's own Python API generates for the commands' arguments."""
    model, tokenizer = load_golden(MODEL)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=32, block_length=16)
    assert text.strip()
    return prompt, text


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    """``mlx_lm_llada.generate --visualize --trace --trace-html``, piped."""
    tmp = tmp_path_factory.mktemp("trace")
    trace, html = tmp / "trace.jsonl", tmp / "trace.html"
    run = subprocess.run(
        command("mlx_lm_llada.generate")
        + ARGS
        + ["--visualize", "--trace", str(trace), "--trace-html", str(html)],
        capture_output=True,
        text=True,
        env=command_env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run, trace, html


def test_live_view_in_a_terminal(expected):
    child = pexpect.spawn(
        command("mlx_lm_llada.generate")[0],
        command("mlx_lm_llada.generate")[1:] + ARGS + ["--visualize"],
        env=command_env(),
        encoding="utf-8",
        dimensions=(24, 80),
        timeout=120,
    )
    child.expect(pexpect.EOF)
    child.close()
    out = child.before.replace("\r\n", "\n")
    assert child.exitstatus == 0, out
    assert MASK_GLYPH in out and "\x1b[J" in out and SHOW_CURSOR in out
    # mlx-lm's text comes after the last frame.
    _, text = expected
    assert out.rindex(text) > out.rindex("canvas: 32/32 tokens")


def test_live_view_in_chat():
    child = pexpect.spawn(
        command("mlx_lm_llada.chat")[0],
        command("mlx_lm_llada.chat")[1:]
        + ["--model", str(GOLDEN / MODEL), "--max-tokens", "16", "--visualize"]
        + ["--block-length", "16"],
        env=command_env(),
        encoding="utf-8",
        dimensions=(24, 80),
        timeout=120,
    )
    child.expect("›")
    child.sendline("hello")
    child.expect(MASK_GLYPH)
    child.expect("canvas: 16/16 tokens")
    child.expect("peak")  # mlx-lm's end of turn, after the canvas
    child.expect("›")
    child.sendline("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_trace_needs_a_directory():
    run = subprocess.run(
        command("mlx_lm_llada.generate") + ARGS + ["--trace", "/nonexistent/t.jsonl"],
        capture_output=True,
        text=True,
        env=command_env(),
        timeout=120,
    )
    assert run.returncode == 2  # a usage error, before the model loads
    assert "Cannot write /nonexistent/t.jsonl" in run.stderr


def test_no_escape_codes_without_a_terminal(piped, expected):
    run, _, _ = piped
    assert ESCAPE not in run.stdout and ESCAPE not in run.stderr
    _, text = expected
    assert text in run.stdout
    assert re.search(r"^canvas: 32/32 tokens · 2/2 blocks", run.stdout, re.M)


def test_trace_replays_to_the_tokens(piped, expected):
    _, trace, _ = piped
    prompt, text = expected
    (run,) = read_trace(trace)
    start, steps, end = run[0], run[1:-1], run[-1]
    assert (start["event"], end["event"]) == ("start", "end")
    assert start["prompt"] == prompt and start["block_length"] == 16
    assert [s["nfe"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(
        s["time"] >= 0 and len(s["confidences"]) == len(s["tokens"]) for s in steps
    )
    assert replay(run) == end["tokens"]
    assert end["text"] == text
    # Each step adds exactly its commits.
    for k, s in enumerate(steps):
        before, after = replay(run, k), replay(run, k + 1)
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert changed == sorted(s["positions"])


def page_parts(html: Path):
    page = html.read_text(encoding="utf-8")
    data = re.search(
        r'<script id="trace-data" type="application/json">(.*?)</script>', page, re.S
    )
    script = re.search(r"<script>\n(.*?)</script>", page, re.S)
    return page, json.loads(data.group(1)), script.group(1)


def test_trace_html_is_self_contained(piped):
    _, trace, html = piped
    page, data, _ = page_parts(html)
    assert not re.search(r"https?://|\ssrc=|<link", page)
    (run,) = read_trace(trace)
    assert data["records"] == run
    for record in run:
        for t in record.get("tokens", []):
            assert str(t) in data["pieces"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_trace_html_replay_in_node(piped, tmp_path):
    _, trace, html = piped
    _, data, script = page_parts(html)
    (tmp_path / "replay.js").write_text(script, encoding="utf-8")
    (tmp_path / "data.json").write_text(json.dumps(data), encoding="utf-8")
    driver = (
        "const {groupRuns, replay} = require(process.argv[1]);"
        "const data = JSON.parse(require('fs').readFileSync(process.argv[2]));"
        "const run = groupRuns(data.records)[0];"
        "const out = [];"
        "for (let k = 0; k <= run.steps.length; k++) out.push(replay(run, k).canvas);"
        "console.log(JSON.stringify(out));"
    )
    node = subprocess.run(
        [
            "node",
            "-e",
            driver,
            str(tmp_path / "replay.js"),
            str(tmp_path / "data.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert node.returncode == 0, node.stderr
    canvases = json.loads(node.stdout)
    (run,) = read_trace(trace)
    assert canvases == [replay(run, k) for k in range(len(run) - 1)]
    assert canvases[-1] == run[-1]["tokens"]


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium)",
)
def test_trace_html_in_chromium(piped, tmp_path):
    _, trace, html = piped
    browser = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    dom = browser.stdout
    assert 'data-replayed="ok"' in dom, browser.stderr[-2000:]
    assert "data-error" not in dom and "Uncaught" not in browser.stderr
    # The page shows the final canvas.
    (run,) = read_trace(trace)
    start, end = run[0], run[-1]
    shown = [int(t) for t in re.findall(r'<span data-token="(\d+)"', dom)]
    assert shown == end["tokens"][start["prompt_length"] :]
