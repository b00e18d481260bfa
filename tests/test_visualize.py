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
from mlx_lm_llada.infill import parse_gaps, template
from mlx_lm_llada.visualize import (
    FIXED,
    FRESH,
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
# A fill in the middle: 12 gap tokens, then a fixed suffix, in blocks of 8
# (the last one shorter, and without a gap).
FILL_PROMPT = "def mean(xs):\\n{{fill:12}}\\n    return total"
FILL_ARGS = ["--model", str(GOLDEN / MODEL), "--prompt", FILL_PROMPT]
FILL_ARGS += ["--block-length", "8", "--reference"]
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


# A fill in the middle in Python ---------------------------------------------


def fill_template(tokenizer, front=2, gap=10, back=3):
    """A canvas of ``front`` fixed tokens, a gap and ``back`` fixed tokens
    after the prompt: 15 tokens, in blocks of 8 the last block is shorter."""
    prompt = tokenizer.encode("hello")
    fixed = tokenizer.encode(" the sky is blue", add_special_tokens=False)
    assert len(fixed) >= front + back
    head, tail = fixed[:front], fixed[len(fixed) - back :]
    return prompt, prompt + head + [MASK] * gap + tail


@pytest.mark.parametrize("spec", [True, False], ids=["spec", "no-spec"])
def test_fill_from_python(monkeypatch, spec):
    monkeypatch.setattr(
        shutil, "get_terminal_size", lambda *a: os.terminal_size((200, 24))
    )
    model, tokenizer = load_golden("tiny-sharp")
    prompt, canvas = fill_template(tokenizer)
    P, T = len(prompt), len(canvas)
    fixed = [p for p in range(P, T) if canvas[p] != MASK]
    out = FakeTerminal()
    view = CanvasView(tokenizer, model.diffusion if spec else None, out=out, fps=1e9)
    trace = TraceRecorder(tokenizer=tokenizer, spec=model.diffusion if spec else None)
    steps = []

    def on_step(st):
        steps.append(st)
        view(st)
        trace(st)

    tokens, _ = diffusion_generate(
        model,
        mx.array([prompt]),
        template=mx.array([canvas]),
        steps=16,
        gen_length=T - P,
        block_length=8,
        on_step=on_step,
    )
    view.finish()
    trace.finish()
    tokens = np.array(tokens)[0].tolist()
    assert [tokens[p] for p in fixed] == [canvas[p] for p in fixed]

    start, records = trace.records[0], trace.records[1:-1]
    assert start["mask_token_id"] == MASK and start["gen_length"] == T - P
    assert start["fixed"] == fixed and start["gap_tokens"] == 10
    assert start["fixed_tokens"] == [canvas[p] for p in fixed]
    assert replay(trace.records, 0) == canvas
    assert replay(trace.records) == tokens
    for r in records:
        assert not set(r["positions"]) & set(fixed)
        assert r["block_end"] == min(r["block_start"] + 8, T)  # the short block
    assert {r["block_end"] for r in records} == {P + 8, T}

    # The fixed tokens are context from the first frame: never fresh, never
    # masks; the summary counts the gap's tokens.
    text = out.getvalue()
    frames = text.split("\x1b[J")
    assert len(frames) == len(steps) + 1
    piece = view.pieces
    head = "".join(piece(canvas[p]) for p in fixed[:2])
    tail = "".join(piece(canvas[p]) for p in fixed[2:])
    for frame in frames:
        assert FIXED + head in frame and FIXED + tail in frame
        assert FRESH + head not in frame and FRESH + tail not in frame
    assert "canvas: 10/10 gap tokens · 2/2 blocks of 8" in ANSI.sub("", frames[-1])


def test_fill_stopped_early_from_python():
    model, tokenizer = load_golden("tiny-eos")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}],
        add_generation_prompt=True,
    )
    suffix = tokenizer.encode(" world ok", add_special_tokens=False)
    P, G = len(prompt), 26
    canvas = prompt + [MASK] * G + suffix
    out = io.StringIO()
    view = CanvasView(tokenizer, model.diffusion, out=out)
    trace = TraceRecorder(spec=model.diffusion)
    steps = []
    tokens, _ = diffusion_generate(
        model,
        mx.array([prompt]),
        template=mx.array([canvas]),
        steps=32,
        gen_length=len(canvas) - P,
        block_length=16,
        early_stop=True,
        on_step=lambda st: (steps.append(st), view(st), trace(st)),
    )
    view.finish()
    trace.finish()
    tokens = np.array(tokens)[0].tolist()
    assert steps[-1].done and tokens[P + G :] == suffix
    # The end padding fills what is left of the gap, not the suffix.
    (last,) = [r for r in trace.records if r.get("done")]
    assert last["filled"] and max(last["filled"]) < P + G
    assert trace.records[0]["fixed"] == list(range(P + G, len(canvas)))
    assert replay(trace.records) == tokens
    assert re.fullmatch(rf"canvas: \d+/{G} gap tokens · .*\n", out.getvalue())


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


def watched(tmp, args):
    """``mlx_lm_llada.generate --visualize --trace --trace-html``, piped."""
    trace, html = tmp / "trace.jsonl", tmp / "trace.html"
    run = subprocess.run(
        command("mlx_lm_llada.generate")
        + args
        + ["--visualize", "--trace", str(trace), "--trace-html", str(html)],
        capture_output=True,
        text=True,
        env=command_env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run, trace, html


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    return watched(tmp_path_factory.mktemp("trace"), ARGS)


@pytest.fixture(scope="module")
def piped_fill(tmp_path_factory):
    """The same for a fill in the middle (``{{fill:12}}`` in the prompt)."""
    return watched(tmp_path_factory.mktemp("fill"), FILL_ARGS)


@pytest.fixture(scope="module")
def fill_layout():
    """The prompt's ids, the gap's length and the suffix's ids of the fill."""
    _, tokenizer = load_golden(MODEL)
    segments = parse_gaps(FILL_PROMPT.replace("\\n", "\n"), 32)
    prompt, (gap, suffix) = template(tokenizer, segments)
    return prompt, gap, suffix


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


def test_fill_summary_counts_the_gap(piped_fill):
    run, _, _ = piped_fill
    assert ESCAPE not in run.stdout and ESCAPE not in run.stderr
    # 12 gap tokens in blocks 1 and 2; block 3 holds only suffix tokens.
    assert re.search(
        r"^canvas: 12/12 gap tokens · 2/2 blocks of 8 · ", run.stdout, re.M
    )


def test_fill_trace_replays_to_the_tokens(piped_fill, fill_layout):
    run, trace, _ = piped_fill
    prompt, gap, suffix = fill_layout
    P, T = len(prompt), len(prompt) + gap + len(suffix)
    (records,) = read_trace(trace)
    start, steps, end = records[0], records[1:-1], records[-1]
    assert start["prompt"] == prompt and start["gen_length"] == gap + len(suffix)
    # The suffix is on the canvas from the start, never committed.
    assert start["fixed"] == list(range(P + gap, T))
    assert start["fixed_tokens"] == suffix and start["gap_tokens"] == gap
    assert replay(records, 0) == prompt + [MASK] * gap + suffix
    fixed = set(start["fixed"])
    assert all(not fixed & set(s["positions"]) for s in steps)
    assert sorted(p for s in steps for p in s["positions"]) == list(range(P, P + gap))
    assert all(s["block_end"] == min(s["block_start"] + 8, T) for s in steps)
    assert replay(records) == end["tokens"] and len(end["tokens"]) == T
    assert end["tokens"][P + gap :] == suffix
    assert end["text"] and end["text"] in run.stdout  # mlx-lm's text: the fill
    for k, s in enumerate(steps):
        before, after = replay(records, k), replay(records, k + 1)
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert changed == sorted(s["positions"])


def test_fill_trace_html_holds_the_records(piped_fill):
    _, trace, html = piped_fill
    page, data, _ = page_parts(html)
    assert not re.search(r"https?://|\ssrc=|<link", page)
    (run,) = read_trace(trace)
    assert data["records"] == run
    for t in run[0]["fixed_tokens"] + run[-1]["tokens"]:
        assert str(t) in data["pieces"]


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
@pytest.mark.parametrize("watch", ["piped", "piped_fill"])
def test_trace_html_replay_in_node(watch, request, tmp_path):
    _, trace, html = request.getfixturevalue(watch)
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
@pytest.mark.parametrize("watch", ["piped", "piped_fill"])
def test_trace_html_in_chromium(watch, request, tmp_path):
    _, trace, html = request.getfixturevalue(watch)
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
    # A fill's fixed tokens show as fixed text, as the prompt does.
    fixed = re.findall(r'<span data-token="(\d+)" class="tok fixed"', dom)
    assert [int(t) for t in fixed] == start.get("fixed_tokens", [])
    assert bool(re.search(r'id="legend-fixed" hidden', dom)) != bool(fixed)
