# Copyright © 2026 mlx-lm-llada contributors.
"""Fill in the middle with a diffusion model: text before and after a gap,
gaps written inside a text, and edits (spans of a text rewritten).

Every function runs mlx-lm's own ``stream_generate``; the canvas is the
prompt, then gaps of mask tokens and fixed text (the model's loop takes it
as ``template``). The prompt is raw text: no chat template is applied.
"""

import re
from typing import Iterable, List, Optional, Tuple, Union

# A gap inside a text: {{fill}} (max_tokens long) or {{fill:N}} (N tokens).
GAP = re.compile(r"\{\{fill(?::(\d+))?\}\}")
_GAP_LIKE = re.compile(r"\{\{\s*fill\b[^}]*\}?\}?")

Segments = List[Union[str, int]]


def parse_gaps(text: str, default_length: int) -> Segments:
    """Split ``text`` at its gaps: ``["before", 16, "between", 8, "after"]``.

    ``{{fill}}`` is a gap of ``default_length`` tokens, ``{{fill:N}}`` one of
    N. Anything else that looks like a gap is refused, naming it."""
    segments: Segments = []
    pos = 0
    for bad in _GAP_LIKE.finditer(text):
        if not GAP.fullmatch(bad.group(0)):
            raise ValueError(
                f"Malformed gap {bad.group(0)!r} at character {bad.start()}: "
                "write {{fill}} or {{fill:N}} with N > 0 tokens"
            )
    for m in GAP.finditer(text):
        length = default_length if m.group(1) is None else int(m.group(1))
        if length <= 0:
            raise ValueError(f"The gap {m.group(0)!r} must be at least one token")
        segments += [text[pos : m.start()], length]
        pos = m.end()
    segments.append(text[pos:])
    return segments


def template(tokenizer, segments: Segments) -> Tuple[List[int], list]:
    """The prompt's ids and the model loop's ``template`` (gap lengths and
    fixed token ids) of ``segments``; the first segment is the prompt."""
    if len(segments) < 3 or not segments[0]:
        raise ValueError(
            "Fill in the middle needs text before the first gap: a diffusion "
            "model needs a prompt"
        )
    prompt = tokenizer.encode(segments[0])
    layout = [
        s if isinstance(s, int) else tokenizer.encode(s, add_special_tokens=False)
        for s in segments[1:]
    ]
    return prompt, [part for part in layout if part != []]


def fill_segments(model, tokenizer, segments: Segments, **kwargs) -> List[str]:
    """The text of each gap of ``segments``, in order, cut at its first end
    token. ``kwargs`` go to mlx-lm's ``stream_generate`` (diffusion
    settings, ``sampler``, ``on_step``)."""
    from mlx_lm import stream_generate

    prompt, layout = template(tokenizer, segments)
    gaps = [n for n in layout if isinstance(n, int)]
    canvas = []
    user_on_step = kwargs.pop("on_step", None)

    def keep_canvas(step):
        canvas[:] = [step.canvas[0]]  # the live canvas, final at the end
        if user_on_step is not None:
            user_on_step(step)

    for _ in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=sum(gaps),
        template=layout,
        on_step=keep_canvas,
        **kwargs,
    ):
        pass
    ends = set(model.diffusion.end_token_ids)
    fills, pos = [], len(prompt)
    for part in layout:
        if isinstance(part, int):
            ids = []
            for t in canvas[0][pos : pos + part].tolist():
                if t in ends:
                    break
                ids.append(t)
            fills.append(tokenizer.decode(ids))
            pos += part
        else:
            pos += len(part)
    return fills


def fill(model, tokenizer, prompt: str, suffix: str = "", max_tokens=256, **kwargs):
    """The text between ``prompt`` and ``suffix``: a gap of ``max_tokens``
    tokens, which a model that ends its fill early pads with its end token
    (not part of the text)."""
    return fill_segments(model, tokenizer, [prompt, max_tokens, suffix], **kwargs)[0]


def fill_gaps(model, tokenizer, text: str, max_tokens=256, **kwargs) -> str:
    """``text`` with each ``{{fill}}`` or ``{{fill:N}}`` gap filled."""
    segments = parse_gaps(text, max_tokens)
    fills = iter(fill_segments(model, tokenizer, segments, **kwargs))
    return "".join(s if isinstance(s, str) else next(fills) for s in segments)


def edit(
    model,
    tokenizer,
    text: str,
    spans: Iterable[Union[str, Tuple[int, int]]],
    max_tokens: Optional[int] = None,
    **kwargs,
) -> str:
    """``text`` with each span rewritten: a span is a substring (its first
    occurrence) or ``(start, end)`` character offsets; it becomes a gap of
    ``max_tokens`` tokens, or of as many tokens as it had; everything else
    is kept."""
    ranges = []
    for span in spans:
        if isinstance(span, str):
            start = text.find(span)
            if not span or start < 0:
                raise ValueError(f"The span {span!r} is not in the text")
            span = (start, start + len(span))
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ValueError(f"The span {span!r} is not a range of the text")
        ranges.append((start, end))
    ranges.sort()
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(f"The spans overlap: {ranges}")
    segments: Segments = []
    pos = 0
    for start, end in ranges:
        old = tokenizer.encode(text[start:end], add_special_tokens=False)
        segments += [text[pos:start], max_tokens or len(old)]
        pos = end
    segments.append(text[pos:])
    fills = iter(fill_segments(model, tokenizer, segments, **kwargs))
    return "".join(s if isinstance(s, str) else next(fills) for s in segments)
