"""The parallel trajectory format (DESIGN section 2): parse, validate, serialize.

A response is a list of parts: plain text (sequential reasoning, the think tags,
the final answer) and parallel blocks. A block keeps the exact whitespace found
between its tags, so ``serialize(parse(x)) == x`` for every parseable ``x``.

``parse`` raises :class:`FormatError` on text it cannot structure (unbalanced or
nested tags, text between threads...). ``validate`` never raises: it returns
every rule a response breaks as a human-readable reason, and an empty list for a
format-valid response. A response without any block is valid (sequential).

Before parsing, ``validate`` checks structural limits on the text alone
(:func:`limit_reasons`: UTF-8 bytes, blocks, threads per block, digits of an
outline or thread number), so a hostile response costs one linear scan and is
never parsed, replayed or tokenized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PARALLEL_OPEN, PARALLEL_CLOSE = "<Parallel>", "</Parallel>"
OUTLINES_OPEN, OUTLINES_CLOSE = "<Outlines>", "</Outlines>"
OUTLINE_OPEN, OUTLINE_CLOSE = "<Outline>", "</Outline>"
THREAD_OPEN, THREAD_CLOSE = "<Thread>", "</Thread>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

BLOCK_TAGS = (
    PARALLEL_OPEN, PARALLEL_CLOSE, OUTLINES_OPEN, OUTLINES_CLOSE,
    OUTLINE_OPEN, OUTLINE_CLOSE, THREAD_OPEN, THREAD_CLOSE,
)
#: Every control tag; each is a single token in the tokenizer.
ALL_TAGS = BLOCK_TAGS + (THINK_OPEN, THINK_CLOSE)

#: Default cap on threads per block used by ``validate`` (``None`` disables it).
DEFAULT_MAX_THREADS = 64
#: Default cap on blocks per response used by ``validate`` (``None`` disables it).
DEFAULT_MAX_BLOCKS = 256
#: Default cap on the UTF-8 bytes of a response used by ``validate`` (``None`` disables it); a response
#: that fills a 32k-token context has about 130,000. Bytes, not characters, bound the tokens: a byte-level
#: tokenizer gives at most one token per byte.
DEFAULT_MAX_BYTES = 1_000_000
#: Most digits of an outline or thread number; longer numbers are no numbers (``leading_number`` gives None).
MAX_NUMBER_DIGITS = 9

_TAG_RE = re.compile("|".join(re.escape(t) for t in BLOCK_TAGS))
_NUMBER_RE = re.compile(r"\s*(\d{1,%d})\s*:" % MAX_NUMBER_DIGITS)
_LONG_NUMBER_RE = re.compile(r"(%s|%s)\s*(\d{%d,})" % (re.escape(OUTLINE_OPEN), re.escape(THREAD_OPEN),
                                                       MAX_NUMBER_DIGITS + 1))
_THREAD_REF_RE = re.compile(r"\b[Tt]hread\s*#?\s*(\d+)")


class FormatError(ValueError):
    """A response that does not follow the block grammar; the message says why."""


def thread_seed(number: int) -> str:
    """Text the orchestrator inserts to start thread ``number`` (DESIGN section 3)."""
    return f"\n{THREAD_OPEN}\n{number}:"


#: Text the orchestrator appends after the last thread of a block before decoding on.
JOIN_SUFFIX = "\n"


@dataclass
class Block:
    """One ``<Parallel>`` block.

    ``outlines`` and ``threads`` hold the raw text inside each ``<Outline>`` and
    ``<Thread>`` tag (number prefix included). ``gaps`` holds the whitespace
    between tags, in document order: after ``<Parallel>``, after ``<Outlines>``,
    after each ``</Outline>``, after ``</Outlines>``, after each ``</Thread>``.
    """

    outlines: list[str]
    threads: list[str]
    gaps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.gaps:
            self.gaps = ["\n"] * (3 + len(self.outlines) + len(self.threads))
        expected = 3 + len(self.outlines) + len(self.threads)
        if len(self.gaps) != expected:
            raise ValueError(f"Block needs {expected} gaps, got {len(self.gaps)}")

    @property
    def outline_numbers(self) -> list[int | None]:
        return [leading_number(o) for o in self.outlines]

    @property
    def thread_numbers(self) -> list[int | None]:
        return [leading_number(t) for t in self.threads]

    def thread_body(self, i: int) -> str:
        """Text of thread ``i`` after its ``N:`` prefix (what the model generates)."""
        m = _NUMBER_RE.match(self.threads[i])
        return self.threads[i][m.end():] if m else self.threads[i]

    def outline_body(self, i: int) -> str:
        m = _NUMBER_RE.match(self.outlines[i])
        return self.outlines[i][m.end():] if m else self.outlines[i]

    def head_text(self) -> str:
        """The block up to and including ``</Outlines>`` (one sequential request)."""
        g = self.gaps
        parts = [PARALLEL_OPEN, g[0], OUTLINES_OPEN, g[1]]
        for i, outline in enumerate(self.outlines):
            parts += [OUTLINE_OPEN, outline, OUTLINE_CLOSE, g[2 + i]]
        parts.append(OUTLINES_CLOSE)
        return "".join(parts)

    def text(self) -> str:
        g, k = self.gaps, len(self.outlines)
        parts = [self.head_text(), g[2 + k]]
        for i, thread in enumerate(self.threads):
            parts += [THREAD_OPEN, thread, THREAD_CLOSE, g[3 + k + i]]
        parts.append(PARALLEL_CLOSE)
        return "".join(parts)


Part = str | Block


@dataclass
class Response:
    """A parsed response: text parts and blocks in document order."""

    parts: list[Part]

    @property
    def blocks(self) -> list[Block]:
        return [p for p in self.parts if isinstance(p, Block)]

    @property
    def is_parallel(self) -> bool:
        return any(isinstance(p, Block) for p in self.parts)


def leading_number(text: str) -> int | None:
    """The ``N`` of a text that starts with ``N:`` (whitespace allowed, at most
    ``MAX_NUMBER_DIGITS`` digits), else None."""
    m = _NUMBER_RE.match(text)
    return int(m.group(1)) if m else None


def serialize(response: Response) -> str:
    return "".join(p if isinstance(p, str) else p.text() for p in response.parts)


def _lex(text: str) -> list[tuple[str, str, int]]:
    """Split ``text`` into ("tag", tag, pos) and ("text", text, pos) tokens."""
    tokens, pos = [], 0
    for m in _TAG_RE.finditer(text):
        if m.start() > pos:
            tokens.append(("text", text[pos:m.start()], pos))
        tokens.append(("tag", m.group(), m.start()))
        pos = m.end()
    if pos < len(text):
        tokens.append(("text", text[pos:], pos))
    return tokens


class _Cursor:
    def __init__(self, text: str):
        self.tokens = _lex(text)
        self.i = 0
        self.block_index = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def where(self) -> str:
        tok = self.peek()
        return f"block {self.block_index}" + (f" at char {tok[2]}" if tok else " at end of text")

    def gap(self, after: str, expected: str) -> str:
        """Optional whitespace; other text here is an error."""
        tok = self.peek()
        if tok is None or tok[0] == "tag":
            return ""
        self.take()
        if tok[1].strip():
            raise FormatError(f"block {self.block_index} at char {tok[2]}: unexpected text {_clip(tok[1])!r} "
                              f"after {after} (expected {expected})")
        return tok[1]

    def expect(self, tag: str, context: str) -> None:
        tok = self.peek()
        if tok is None:
            raise FormatError(f"block {self.block_index}: truncated, expected {tag} {context}")
        if tok[0] != "tag" or tok[1] != tag:
            shown = tok[1] if tok[0] == "tag" else f"text {_clip(tok[1])!r}"
            raise FormatError(f"{self.where()}: expected {tag} {context}, found {shown}")
        self.take()

    def inner(self, open_tag: str, close_tag: str) -> str:
        """Text between an already consumed ``open_tag`` and its ``close_tag``."""
        tok = self.peek()
        content = ""
        if tok is not None and tok[0] == "text":
            content = self.take()[1]
        tok = self.peek()
        if tok is None:
            raise FormatError(f"block {self.block_index}: truncated inside {open_tag}, missing {close_tag}")
        if tok[1] != close_tag:
            nested = " (blocks cannot nest)" if tok[1] == PARALLEL_OPEN else ""
            raise FormatError(f"{self.where()}: {tok[1]} inside {open_tag}{nested}")
        self.take()
        return content


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _parse_block(cur: _Cursor) -> Block:
    gaps = [cur.gap(PARALLEL_OPEN, OUTLINES_OPEN)]
    cur.expect(OUTLINES_OPEN, f"after {PARALLEL_OPEN}")
    gaps.append(cur.gap(OUTLINES_OPEN, f"{OUTLINE_OPEN} or {OUTLINES_CLOSE}"))
    outlines: list[str] = []
    while (tok := cur.peek()) is not None and tok[1] == OUTLINE_OPEN:
        cur.take()
        outlines.append(cur.inner(OUTLINE_OPEN, OUTLINE_CLOSE))
        gaps.append(cur.gap(OUTLINE_CLOSE, f"{OUTLINE_OPEN} or {OUTLINES_CLOSE}"))
    cur.expect(OUTLINES_CLOSE, "to close the outlines")
    gaps.append(cur.gap(OUTLINES_CLOSE, THREAD_OPEN))
    threads: list[str] = []
    while (tok := cur.peek()) is not None and tok[1] == THREAD_OPEN:
        cur.take()
        threads.append(cur.inner(THREAD_OPEN, THREAD_CLOSE))
        gaps.append(cur.gap(THREAD_CLOSE, f"{THREAD_OPEN} or {PARALLEL_CLOSE}"))
    cur.expect(PARALLEL_CLOSE, "to close the block")
    return Block(outlines, threads, gaps)


def parse(text: str) -> Response:
    """Structure ``text`` into text parts and blocks; raise FormatError if impossible.

    Only the tag grammar is checked here; numbering and content rules are
    checked by :func:`validate`.
    """
    cur = _Cursor(text)
    parts: list[Part] = []
    while (tok := cur.peek()) is not None:
        kind, value, pos = cur.take()
        if kind == "text":
            parts.append(value)
        elif value == PARALLEL_OPEN:
            cur.block_index += 1
            parts.append(_parse_block(cur))
        else:
            raise FormatError(f"char {pos}: {value} outside a {PARALLEL_OPEN} block")
    return Response(parts)


def block_reasons(block: Block, index: int, max_threads: int | None = DEFAULT_MAX_THREADS) -> list[str]:
    """Every content rule of DESIGN section 2 that ``block`` breaks."""
    where = f"block {index}"
    reasons: list[str] = []
    k = len(block.outlines)
    if k == 0:
        reasons.append(f"{where}: no outlines")
    if max_threads is not None and max(k, len(block.threads)) > max_threads:
        reasons.append(f"{where}: {max(k, len(block.threads))} threads, more than the limit of {max_threads}")
    outline_numbers = block.outline_numbers
    for i, n in enumerate(outline_numbers):
        if n is None:
            reasons.append(f"{where}: outline {i + 1} does not start with 'N:'")
        elif not block.outline_body(i).strip():
            reasons.append(f"{where}: outline {n} is empty")
    if None not in outline_numbers and outline_numbers != list(range(1, k + 1)):
        reasons.append(f"{where}: outlines are numbered {_numbers(outline_numbers)}, expected 1..{k}")
    if len(block.threads) != k:
        reasons.append(f"{where}: {k} outlines but {len(block.threads)} threads")
    thread_numbers = block.thread_numbers
    for i, n in enumerate(thread_numbers):
        if n is None:
            reasons.append(f"{where}: thread {i + 1} does not start with 'N:'")
            continue
        body = block.thread_body(i)
        if not body.strip():
            reasons.append(f"{where}: thread {n} is empty")
        refs = thread_references(body, n)
        if refs:
            reasons.append(f"{where}: thread {n} refers to thread {_numbers(refs)}")
    if None not in thread_numbers and None not in outline_numbers and thread_numbers != outline_numbers:
        reasons.append(
            f"{where}: threads are numbered {_numbers(thread_numbers)}, outlines {_numbers(outline_numbers)}"
        )
    return reasons


def thread_references(text: str, own: int | None = None) -> list[int]:
    """Numbers of the threads that ``text`` names ("thread 2", "Thread #3"), ``own`` left out."""
    return sorted({int(r) for r in _THREAD_REF_RE.findall(text) if len(r) <= MAX_NUMBER_DIGITS} - {own})


def _numbers(ns: list) -> str:
    shown = ",".join(str(n) for n in ns[:10])
    return shown + (f",... ({len(ns)} in all)" if len(ns) > 10 else "")


def _think_reasons(response: Response) -> list[str]:
    text_before_think_close = True
    opens = closes = 0
    reasons = []
    for part in response.parts:
        if isinstance(part, Block):
            if not text_before_think_close:
                reasons.append("a block appears after </think> (in the final answer)")
            continue
        for m in re.finditer(re.escape(THINK_OPEN) + "|" + re.escape(THINK_CLOSE), part):
            if m.group() == THINK_OPEN:
                opens += 1
                if closes:
                    reasons.append("<think> after </think>")
            else:
                closes += 1
                if closes > opens:
                    reasons.append("</think> without <think>")
                text_before_think_close = False
    if opens > closes:
        reasons.append("<think> is never closed (truncated reasoning)")
    if opens > 1 or closes > 1:
        reasons.append(f"{opens} <think> and {closes} </think> tags, expected at most one of each")
    return reasons


def utf8_bytes(text: str) -> int:
    """Length of ``text`` in UTF-8 (a lone surrogate counts 3 bytes)."""
    return len(text.encode("utf-8", "surrogatepass"))


def limit_reasons(text: str, max_threads: int | None = DEFAULT_MAX_THREADS,
                  max_blocks: int | None = DEFAULT_MAX_BLOCKS, max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """The structural limits ``text`` breaks, counted on the text without parsing it (linear time).

    Blocks are counted by their ``<Parallel>`` tags and a block's threads by
    the ``<Outline>`` or ``<Thread>`` tags (whichever are more) up to the next
    ``<Parallel>``; a number after ``<Outline>`` or ``<Thread>`` may have at
    most ``MAX_NUMBER_DIGITS`` digits. ``None`` disables a limit.
    """
    if max_bytes is not None and utf8_bytes(text) > max_bytes:
        return [f"the response has {utf8_bytes(text)} bytes (UTF-8), more than the limit of {max_bytes}"]
    reasons = []
    segments = text.split(PARALLEL_OPEN)[1:]
    if max_blocks is not None and len(segments) > max_blocks:
        reasons.append(f"the response has {len(segments)} blocks, more than the limit of {max_blocks}")
    if max_threads is not None:
        for index, segment in enumerate(segments, start=1):
            k = max(segment.count(OUTLINE_OPEN), segment.count(THREAD_OPEN))
            if k > max_threads:
                reasons.append(f"block {index}: {k} threads, more than the limit of {max_threads}")
                break
    m = _LONG_NUMBER_RE.search(text)
    if m:
        kind = "outline" if m.group(1) == OUTLINE_OPEN else "thread"
        reasons.append(f"char {m.start(2)}: {kind} number with {len(m.group(2))} digits, "
                       f"more than {MAX_NUMBER_DIGITS}")
    return reasons


def validate(text: str, max_threads: int | None = DEFAULT_MAX_THREADS, max_blocks: int | None = DEFAULT_MAX_BLOCKS,
             max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """Reasons why ``text`` is not format-valid; empty if it is. Never raises.

    A response that breaks a structural limit (:func:`limit_reasons`) gets
    those reasons only: it is not parsed.
    """
    reasons = limit_reasons(text, max_threads, max_blocks, max_bytes)
    if reasons:
        return reasons
    try:
        response = parse(text)
    except FormatError as e:
        return [str(e)]
    reasons = _think_reasons(response)
    for i, block in enumerate(response.blocks, start=1):
        reasons += block_reasons(block, i, max_threads)
    return reasons


def is_valid(text: str, max_threads: int | None = DEFAULT_MAX_THREADS, max_blocks: int | None = DEFAULT_MAX_BLOCKS,
             max_bytes: int | None = DEFAULT_MAX_BYTES) -> bool:
    return not validate(text, max_threads, max_blocks, max_bytes)


def canonicalize(response: Response) -> Response:
    """The response as the orchestrator would have produced it.

    The orchestrator inserts each thread's seed (``"\\n<Thread>\\nN:"``) and the
    newline after the last thread itself, so the whitespace it controls is
    normalised: the gap after ``</Outlines>`` and after each ``</Thread>`` is one
    newline, and each thread reads ``"\\nN:" + body``. Model-written whitespace
    (inside outlines, between outline tags) is kept.
    """
    parts: list[Part] = []
    for part in response.parts:
        if isinstance(part, str):
            parts.append(part)
            continue
        k = len(part.outlines)
        threads = [f"\n{n}:{part.thread_body(i)}" if (n := leading_number(t)) is not None else t
                   for i, t in enumerate(part.threads)]
        gaps = part.gaps[: 2 + k] + ["\n"] * (1 + len(part.threads))
        parts.append(Block(list(part.outlines), threads, gaps))
    return Response(parts)


def flatten(response: Response) -> str:
    """The response with every block turned into plain sequential text.

    Outlines are dropped and threads become consecutive lines without tags or
    number prefixes: the sequential baseline sees the same reasoning.
    """
    out = []
    for part in response.parts:
        if isinstance(part, str):
            out.append(part)
        else:
            out.append("\n".join(part.thread_body(i).strip() for i in range(len(part.threads))))
    return "".join(out)
