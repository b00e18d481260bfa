"""Watch the canvas fill: a live terminal view and a trace of every step.

Both are step callbacks of the diffusion sampler (``on_step``, which receives
a :class:`~mlx_lm_llada.diffusion.Step` after every model call):

- :class:`CanvasView` redraws the canvas in a terminal while it fills
  (``--visualize``); without a terminal it prints one plain summary line.
- :class:`TraceRecorder` records every step as JSON lines (``--trace``) and
  writes a self-contained HTML page that replays the fill (``--trace-html``).
- :func:`watch_command` installs them in one of mlx-lm's commands.

A fill in the middle starts from a canvas whose generated region holds fixed
tokens (the text after and between gaps) besides the gaps of masks: both
watchers take the first step's canvas, less what that step committed, as
the canvas the generation started from, and show its fixed tokens as context.

In Python, pass either one as ``on_step``::

    trace = TraceRecorder(
        "trace.jsonl", html="trace.html", tokenizer=tokenizer, spec=model.diffusion
    )
    diffusion_generate(model, prompt, on_step=trace)
    trace.finish()
"""

import functools
import json
import math
import shutil
import sys
import time
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

MASK_GLYPH = "░"
END_GLYPH = "·"
TEMPLATE = Path(__file__).with_name("trace_replay.html")

# ANSI styles of the live view.
RESET = "\x1b[0m"
FRESH = "\x1b[1;30;42m"  # committed since the last frame
CURRENT = "\x1b[4m"  # a committed token of the current block
CURRENT_MASK = "\x1b[33m"
FIXED = "\x1b[36m"  # a fixed token of a fill: context, never committed
DIM = "\x1b[2m"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def display_piece(text: str) -> str:
    """One token's text as one visible run of characters.

    Newlines and control characters get a visible stand-in so that the
    canvas keeps its layout while it fills; an empty piece (an id past the
    tokenizer's vocabulary) shows as the replacement character.
    """
    if not text:
        return "\ufffd"
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵")
        elif ord(ch) < 32:
            out.append(chr(0x2400 + ord(ch)))  # Unicode's control pictures
        elif ord(ch) == 127:
            out.append("␡")
        elif unicodedata.category(ch) == "Cc":
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def _width(text: str) -> int:
    return sum(
        (
            0
            if unicodedata.combining(ch)
            else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        )
        for ch in text
    )


def _clip(text: str, width: int) -> str:
    # A line that wraps would throw the redraw's line count off.
    while _width(text) > width:
        text = text[:-1]
    return text


class _Pieces:
    """Token id -> display text, decoded once per id."""

    def __init__(self, tokenizer=None, spec=None):
        self.tokenizer = tokenizer
        self.mask = spec.mask_token_id if spec is not None else None
        self.end = set(spec.end_token_ids) if spec is not None else set()
        # Uniform noise (DiffusionGemma): no masks, every canvas token a draft.
        self.uniform = spec is not None and spec.noise == "uniform"
        # What an early stop pads the gaps with (the loop's choice).
        self.pad = None
        if spec is not None and spec.end_token_ids:
            self.pad = spec.eos_token_id
            if self.pad is None:
                self.pad = spec.end_token_ids[0]
        self._cache: Dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._cache:
            if self.tokenizer is None:
                text = f"[{token}]"
            else:
                text = display_piece(self.tokenizer.decode([token]))
            self._cache[token] = text
        return self._cache[token]

    def decode(self, tokens) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([int(t) for t in tokens])


def _prompt_length(st) -> int:
    return st.prompt_length


def _block_end(st) -> int:
    # A fill's last block may be shorter than the others.
    return min(st.block_start + st.block_length, st.canvas.shape[1])


def _first_mask(st, row: int) -> Optional[int]:
    # Without a spec: what the first step left masked of the positions it
    # was called for (masks then, unless it committed nothing: a call that
    # only refreshes a cache), else of the generated region (a fill's fixed
    # tokens too: the most common token).
    canvas = st.canvas[row]
    left = np.setdiff1d(np.asarray(st.positions, dtype=np.int64), st.committed[row])
    if not len(left) or not len(st.committed[row]):
        left = np.setdiff1d(
            np.arange(_prompt_length(st), len(canvas)), st.committed[row]
        )
    if not len(left):
        return None
    values, counts = np.unique(canvas[left], return_counts=True)
    return int(values[np.argmax(counts)])


class _Start:
    """The canvas a generation started from, as its first step tells it.

    That canvas is the first step's, less the positions it committed (masks
    before it) and, when it stopped early, less its end padding (masks too).
    Its tokens after the prompt that are not masks are ``fixed``: the text
    after and between the gaps of a fill (none for a plain generation).
    """

    def __init__(self, st, row: int, pieces: _Pieces):
        mask = -1 if pieces.mask is None else pieces.mask
        P = _prompt_length(st)
        if pieces.uniform:
            # Every position after the prompt is drawn: nothing is fixed.
            self.canvas = np.array(st.canvas[row], dtype=np.int64)
            self.fixed = np.zeros(0, dtype=np.int64)
            self.gap_tokens = len(self.canvas) - P
            self.blocks = -(-self.gap_tokens // st.block_length)
            return
        canvas = np.array(st.canvas[row], dtype=np.int64)
        canvas[st.committed[row]] = mask
        if st.done and pieces.pad is not None:
            # The padding of a gap is indistinguishable from a fixed end
            # token: the padding token counts as padding.
            gen = canvas[P:]
            gen[gen == pieces.pad] = mask
        self.canvas = canvas
        gap = canvas[P:] == mask
        self.fixed = np.flatnonzero(~gap) + P
        self.gap_tokens = int(gap.sum())
        # The blocks that have gaps: the loop makes no call in the others.
        self.blocks = len(np.unique(np.flatnonzero(gap) // st.block_length))


class CanvasView:
    """Redraws the canvas of one generation in the terminal after each step.

    Masks show as ``░`` (yellow in the current block), tokens committed since
    the last frame are highlighted, the current block's tokens underlined,
    end tokens shown as a dim ``·``, and a fill's fixed tokens (context, not
    generated) in cyan. A progress line follows; for a fill it counts the
    gap tokens. Only the first row of a batch is drawn. Without a terminal
    (``out`` is not a tty) nothing is drawn live; :meth:`finish` prints one
    plain summary line.
    """

    def __init__(self, tokenizer=None, spec=None, out=None, fps: float = 30.0):
        self.out = out or sys.stdout
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.pieces = _Pieces(tokenizer, spec)
        self.interval = 1.0 / fps
        self.begin()

    def begin(self):
        """Start a new generation (the next step opens a new canvas)."""
        self.step = None
        self.canvas = None
        self.initial = None  # _Start
        self.fixed = set()
        self.blocks = set()  # the blocks that had a step
        self.fresh = set()
        self.committed = 0
        self.lines = 0
        self.drawn_at = -math.inf
        self.start = time.perf_counter()

    def __call__(self, st):
        if self.step is None:
            if self.pieces.mask is None and not self.pieces.uniform:
                self.pieces.mask = _first_mask(st, 0)
            self.initial = _Start(st, 0, self.pieces)
            self.fixed = set(self.initial.fixed.tolist())
        self.step = st
        self.canvas = st.canvas[0]
        self.blocks.add(st.block)
        for pos in st.committed[0]:
            self.fresh.add(int(pos))
        if self.pieces.uniform:
            # Drafts are redrawn every step: count the committed canvases.
            self.committed = st.final_end - _prompt_length(st)
        else:
            self.committed += len(st.committed[0])
        now = time.perf_counter()
        # At most ``fps`` frames a second: a frame costs more than a tiny
        # model's step.
        if self.live and (self.lines == 0 or now - self.drawn_at >= self.interval):
            self._draw()
            self.drawn_at = now

    def finish(self):
        """Draw the last frame (or print the summary line) and end the view."""
        if self.step is None:
            return
        if self.live:
            self._draw(final=True)
            self.out.write("\n" + SHOW_CURSOR)
        else:
            self.out.write(self.progress(final=True) + "\n")
        self.out.flush()
        self.step = None

    def progress(self, final: bool = False) -> str:
        st = self.step
        start = self.initial
        # A fill counts its gaps' tokens, and the blocks that have gaps.
        gen = start.gap_tokens
        tokens = "gap tokens" if self.fixed else "tokens"
        seconds = time.perf_counter() - self.start
        rate = self.committed / max(seconds, 1e-9)
        block = f"{len(self.blocks)}/{start.blocks}"
        if final:
            return (
                f"canvas: {self.committed}/{gen} {tokens} · {block} "
                f"blocks of {st.block_length} · nfe {st.nfe} · {seconds:.2f} s · "
                f"{rate:.1f} tok/s"
            )
        return (
            f"block {block} · step {st.step + 1} · "
            f"{self.committed}/{gen} {tokens} · nfe {st.nfe} · {rate:.1f} tok/s"
        )

    def render(self, width: int, height: int) -> List[str]:
        """The frame: canvas lines (at most ``height - 1``), then progress."""
        st = self.step
        P = _prompt_length(st)
        L = st.block_length
        block_end = _block_end(st)
        mask = self.pieces.mask
        lines, line, used = [], [], 0  # line: [style, text] runs
        current_line = 0

        def newline():
            nonlocal line, used
            lines.append("".join(s + t + RESET if s else t for s, t in line))
            line, used = [], 0

        def put(text, style):
            nonlocal used
            # Keep a token on one line when it fits in one.
            if used and used + _width(text) > width >= _width(text):
                newline()
            for ch in text:
                if used + _width(ch) > width:
                    newline()
                if line and line[-1][0] == style:
                    line[-1][1] += ch
                else:
                    line.append([style, ch])
                used += _width(ch)

        for pos in range(P, len(self.canvas)):
            if pos > P and (pos - P) % L == 0:
                put("│", DIM)  # a block boundary
            if pos == st.block_start:
                current_line = len(lines)
            current = st.block_start <= pos < block_end
            token = int(self.canvas[pos])
            if pos in self.fixed:
                put(self.pieces(token), FIXED)
            elif token == mask:
                put(MASK_GLYPH, CURRENT_MASK if current else DIM)
            elif pos in self.fresh:
                put(self.pieces(token), FRESH)
            elif token in self.pieces.end:
                put(END_GLYPH, DIM)
            else:
                put(self.pieces(token), CURRENT if current else "")
        newline()
        # A canvas taller than the terminal: show the lines of the current
        # block (cursor movement cannot reach above the screen).
        room = max(height - 1, 1)
        if len(lines) > room:
            first = max(0, min(current_line, len(lines) - room))
            lines = lines[first : first + room]
        return lines + [_clip(self.progress(), width)]

    def _draw(self, final: bool = False):
        size = shutil.get_terminal_size()
        lines = self.render(max(size.columns - 1, 10), max(size.lines - 1, 2))
        if final:
            lines[-1] = _clip(self.progress(final=True), size.columns - 1)
        if self.lines:
            # Back to the first line of the last frame, and clear below.
            up = f"\x1b[{self.lines - 1}A" if self.lines > 1 else ""
            head = "\r" + up + "\x1b[J"
        else:
            head = HIDE_CURSOR
        self.out.write(head + "\n".join(lines))
        self.out.flush()
        self.lines = len(lines)
        self.fresh.clear()


def _finite(x: float) -> Optional[float]:
    return round(float(x), 6) if math.isfinite(x) else None


class TraceRecorder:
    """Records every step of each generation; replays them as HTML.

    Each generation is a *run* of records: ``start`` (prompt, canvas size,
    block length, mask id and, for a fill in the middle, the ``fixed``
    positions after the prompt that hold ``fixed_tokens`` from the start:
    the text after and between the gaps), one ``step`` per model call (block,
    step,
    committed ``positions`` on the canvas, their ``tokens`` and
    ``confidences``, ``nfe``, ``time`` in seconds since the run began, and
    on an early stop the ``filled`` end padding), and ``end`` (the final
    canvas). Records go to ``jsonl`` as JSON lines while the run goes; the
    ``html`` page is rewritten with every run at each :meth:`finish`.
    """

    def __init__(
        self,
        jsonl=None,
        html=None,
        tokenizer=None,
        spec=None,
        row: int = 0,
        title: str = "mlx-lm-llada",
    ):
        self.jsonl_path, self.html_path = jsonl, html
        self.row = row
        self.title = title
        self.records: List[dict] = []
        self._file = open(jsonl, "w", encoding="utf-8") if jsonl else None
        self.pieces = _Pieces(tokenizer, spec)
        self.runs = 0
        self.begin()

    def begin(self, tokenizer=None, spec=None):
        """Start a new run (``time`` counts from here)."""
        if tokenizer is not None or spec is not None:
            self.pieces = _Pieces(tokenizer, spec)
        self.start = time.perf_counter()
        self.canvas = None
        self.seen = None

    def __call__(self, st):
        row = st.canvas[self.row]
        P = _prompt_length(st)
        mask = self.pieces.mask
        if self.canvas is None:
            if mask is None and not self.pieces.uniform:
                mask = self.pieces.mask = _first_mask(st, self.row)
            start = _Start(st, self.row, self.pieces)
            self.seen = np.zeros(len(row), dtype=bool)
            self.seen[start.fixed] = True  # never committed, never padding
            self.prompt_length = P
            prompt = [int(t) for t in start.canvas[:P]]
            record = dict(
                event="start",
                prompt=prompt,
                prompt_text=self.pieces.decode(prompt),
                prompt_length=P,
                gen_length=len(row) - P,
                block_length=st.block_length,
                mask_token_id=mask,
                end_token_ids=sorted(self.pieces.end),
            )
            if len(start.fixed):
                record.update(
                    fixed=[int(p) for p in start.fixed],
                    fixed_tokens=[int(start.canvas[p]) for p in start.fixed],
                    gap_tokens=start.gap_tokens,
                )
            self._record(**record)
        self.canvas = row
        positions = st.committed[self.row]
        self.seen[positions] = True
        record = dict(
            event="step",
            block=st.block,
            step=st.step,
            block_start=st.block_start,
            block_end=_block_end(st),
            positions=[int(p) for p in positions],
            tokens=[int(row[p]) for p in positions],
            confidences=[_finite(c) for c in st.confidence[self.row]],
            nfe=st.nfe,
            time=round(time.perf_counter() - self.start, 6),
            done=st.done,
        )
        if st.done:
            # Early stop fills the rest of the canvas with end tokens.
            filled = np.flatnonzero(~self.seen[P:] & (row[P:] != mask)) + P
            if len(filled):
                record["filled"] = [int(p) for p in filled]
                record["filled_tokens"] = [int(row[p]) for p in filled]
                self.seen[filled] = True
        self._record(**record)

    def finish(self, text: Optional[str] = None):
        """End the run: the ``end`` record, then the HTML page."""
        if self.canvas is None:
            return
        tokens = [int(t) for t in self.canvas]
        P = self.prompt_length
        self._record(
            event="end",
            tokens=tokens,
            text=text if text is not None else self.pieces.decode(tokens[P:]),
            nfe=self.records[-1]["nfe"],
            time=round(time.perf_counter() - self.start, 6),
        )
        if self._file is not None:
            self._file.flush()
        self.runs += 1
        self.canvas = None
        if self.html_path:
            self.write_html(self.html_path)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def _record(self, **fields):
        record = {"run": self.runs, **fields}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write_html(self, path):
        """A self-contained page (inline script and style) replaying the runs."""
        tokens = {self.pieces.mask}
        for r in self.records:
            tokens.update(r.get("tokens", ()))
            tokens.update(r.get("filled_tokens", ()))
            tokens.update(r.get("fixed_tokens", ()))
            tokens.update(r.get("prompt", ()))
        data = {
            "title": self.title,
            "records": self.records,
            "pieces": {str(t): self.pieces(t) for t in sorted(tokens - {None})},
        }
        # "</script>" or "<!--" in a token would end the script element early.
        payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
        page = TEMPLATE.read_text(encoding="utf-8").replace("__TRACE_DATA__", payload)
        Path(path).write_text(page, encoding="utf-8")


def read_trace(path) -> List[List[dict]]:
    """The runs of a ``--trace`` file, each a list of records."""
    runs: Dict[int, List[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                runs.setdefault(record["run"], []).append(record)
    return [runs[k] for k in sorted(runs)]


def replay(run: List[dict], upto: Optional[int] = None) -> List[int]:
    """The canvas after the first ``upto`` steps of a run (all by default)."""
    start = run[0]
    mask = start["mask_token_id"]
    canvas = list(start["prompt"]) + [mask] * start["gen_length"]
    for p, t in zip(start.get("fixed", ()), start.get("fixed_tokens", ())):
        canvas[p] = t  # a fill's fixed tokens
    steps = [r for r in run if r["event"] == "step"][:upto]
    for r in steps:
        for p, t in zip(r["positions"], r["tokens"]):
            canvas[p] = t
        for p, t in zip(r.get("filled", ()), r.get("filled_tokens", ())):
            canvas[p] = t
    return canvas


def watch_command(module, visualize=False, trace=None, trace_html=None):
    """Watch each generation of an mlx-lm command (``mlx_lm.generate``'s or
    ``mlx_lm.chat``'s module): wraps its ``stream_generate``, which knows the
    tokenizer and where a generation begins and ends. Returns the undo.

    With the live view, mlx-lm's own text comes after the canvas is done:
    the canvas is the live display, and the two would overwrite each other.
    """
    if not (visualize or trace or trace_html):
        return lambda: None
    for path in (trace, trace_html):
        # Fail before the model loads, not after the generation.
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"Cannot write {path}: its directory does not exist")
    stream_generate = module.stream_generate
    recorder = None
    if trace or trace_html:
        recorder = TraceRecorder(trace, html=trace_html)

    @functools.wraps(stream_generate)
    def watched_stream_generate(model, tokenizer, prompt, **kwargs):
        spec = getattr(model, "diffusion", None)
        if spec is None:
            raise ValueError(
                "--visualize, --trace and --trace-html watch the canvas of a "
                "masked-diffusion model; this model is not one"
            )
        view = CanvasView(tokenizer, spec) if visualize else None
        watchers = [w for w in (view, recorder) if w is not None]
        if recorder is not None:
            recorder.begin(tokenizer, spec)
        user_on_step = kwargs.pop("on_step", None)

        def on_step(st):
            for watcher in watchers:
                watcher(st)
            if user_on_step is not None:
                user_on_step(st)

        held, text = [], ""
        try:
            for response in stream_generate(
                model, tokenizer, prompt, on_step=on_step, **kwargs
            ):
                text += response.text
                if view is None:
                    yield response
                else:
                    held.append(response)
        finally:
            if view is not None:
                view.finish()
            if recorder is not None:
                recorder.finish(text)
        yield from held

    module.stream_generate = watched_stream_generate

    def undo():
        module.stream_generate = stream_generate
        if recorder is not None:
            recorder.close()

    return undo
