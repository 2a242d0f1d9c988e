"""Running detectors over text: a whole text (a prompt), or a stream of pieces (an answer).

`Scanner.find` costs one RE2 pass over a text that holds nothing (the common case): all the
patterns combined into one alternation (RE2 runs it as one automaton). Only where that pass
finds a candidate does each pattern scan, from the first candidate on. Each pattern's scan is
linear (RE2) and resumes after its last match (or its extension), and every check is bounded
by the pattern's `max_len`: bounded work per byte, whatever the text or the patterns.

`StreamScanner` is the same over a stream: a match may be split across pieces (a card number
over two events), so it holds back the last `hold` bytes (the longest span any pattern can
examine) and releases the rest, masked; a value that goes on past a piece (a private key
block) keeps being masked as it comes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import re2

from .detectors import Extension, Pattern, compile_re2, re2_options


class Found(NamedTuple):
    start: int  # byte offsets of the value in the text
    end: int
    pattern: int  # index into the scanner's patterns


class Scanner:
    """A set of patterns, compiled once per config."""

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = tuple(patterns)
        self._compiled = [compile_re2(p.regex) for p in self.patterns]
        self.extents = [_Extent(p.extend) if p.extend is not None else None for p in self.patterns]
        self.hold = max((p.max_len for p in self.patterns), default=0)
        self._any: Any = None
        if len(self.patterns) > 1:
            options = re2_options()
            options.never_capture = True
            try:  # one pass for all; too big for RE2's memory bound: each pattern scans instead
                self._any = re2.compile("|".join(f"(?:{p.regex})" for p in self.patterns), options)
            except re2.error:
                self._any = None

    def find(self, text: bytes, final: bool = True) -> list[Found]:
        """Every value in `text`, by pattern, in order of the patterns then of position. Not
        `final` (a stream): a value that may go on past the text ends where the text does."""
        begin = 0
        if self._any is not None:
            first = self._any.search(text)
            if first is None:
                return []
            begin = first.start()
        found: list[Found] = []
        for index, compiled in enumerate(self._compiled):
            self._scan(index, compiled, text, begin, found, final)
        return found

    def _scan(self, index: int, compiled: Any, text: bytes, pos: int, found: list[Found], final: bool) -> None:
        pattern = self.patterns[index]
        group, validate, extent = pattern.group, pattern.validate, self.extents[index]
        limit = len(text)
        while pos <= limit:
            match = compiled.search(text, pos)
            if match is None:
                return
            start, end = match.span(group)
            after = match.end()
            if end > start and (validate is None or validate(text, start, end)):
                if extent is not None:
                    end = extent.end(text, end, final)[0]
                    after = max(after, end)
                found.append(Found(start, end, index))
            pos = after if after > pos else pos + 1


class _Extent:
    """Where a value that goes on past its pattern's match ends: after its run of the class, and
    for a block, after the end line that follows that run (`-----END ...-----`)."""

    CLOSE_WITHIN = 80  # bytes after the end marker in which its closing "-----" must come

    def __init__(self, extend: Extension):
        self._run = re.compile(b"[" + extend.more + b"]*")  # one class, anchored: linear in Python's re
        self._until = extend.until

    def end(self, text: bytes, pos: int, final: bool) -> tuple[int, bool]:
        """(end, open): open when the value may go on past the text (a stream's next piece); then
        `end` is how far it surely goes."""
        matched = self._run.match(text, pos)
        run = matched.end() if matched is not None else pos
        until = self._until
        if until is None:
            return run, run == len(text) and not final
        if text.startswith(until, run):
            after = run + len(until)
            close = text.find(b"-----", after, after + self.CLOSE_WITHIN)
            if close != -1:
                return close + 5, False
            if not final and len(text) < after + self.CLOSE_WITHIN:
                return run, True  # its end line is still coming
            return after, False
        if not final and (run == len(text) or until.startswith(text[run:run + len(until)])):
            return run, True  # the run, or the end marker, may go on in the next piece
        return run, False


def masked(text: bytes, found: Sequence[Found], placeholders: Sequence[bytes]) -> bytes:
    """`text` with each found value replaced by its pattern's placeholder. Overlapping values are
    masked as one (the first, then the longest, from where it starts)."""
    parts: list[bytes] = []
    done = 0
    for start, end, index in sorted(found, key=lambda f: (f.start, -f.end)):
        if end <= done:
            continue
        if start < done:  # overlaps the value just masked: mask what is left of it too
            start = done
        else:
            parts.append(text[done:start])
            parts.append(placeholders[index])
        done = end
    parts.append(text[done:])
    return b"".join(parts)


class Released(NamedTuple):
    text: bytes  # what may be sent on now, masked
    found: list[Found]  # what was found in it (offsets in the stream so far, for counting)


class StreamScanner:
    """A scanner over one stream of text pieces (phase 2: answers' deltas). Holds back only the
    last `hold` bytes; masks as `masked` does. One per stream: `feed` each piece, `close` at the end."""

    def __init__(self, scanner: Scanner, mask: frozenset[int] = frozenset()):
        self._scanner = scanner
        self._mask = mask  # the patterns whose values are masked (the others are only found)
        self._placeholders = [p.placeholder for p in scanner.patterns]
        self._buffer = b""
        self._offset = 0  # stream offset of the buffer's first byte
        self._open: int | None = None  # a masked value goes on at the buffer's start (its placeholder sent)
        self._context = b""  # the byte before the buffer: a pattern's leading boundary

    def feed(self, piece: bytes) -> Released:
        self._buffer += piece
        return self._release(final=False)

    def close(self) -> Released:
        return self._release(final=True)

    def _release(self, final: bool) -> Released:
        if self._open is not None:  # inside a masked value that went on: dropped until it ends
            extent = self._scanner.extents[self._open]
            assert extent is not None
            end, still_open = extent.end(self._buffer, 0, final)
            self._advance(end)
            if still_open:
                return Released(b"", [])
            self._open = None
        context, buffer = self._context, self._buffer
        text = context + buffer
        shift = len(context)
        cut = len(text) if final else max(len(text) - self._scanner.hold, shift)  # a value starting
        # before `cut` cannot change with more text: it is shorter than `hold`
        found_now = [f for f in self._scanner.find(text, final) if f.start >= shift]  # not in the context
        kept = [f for f in found_now if f.start < cut]
        release_to = max([cut, *(f.end for f in kept)])
        while True:  # a value overlapping one released is released (masked) with it
            more = [f for f in found_now if cut <= f.start < release_to and f not in kept]
            if not more:
                break
            kept.extend(more)
            release_to = max([release_to, *(f.end for f in more)])
        for f in kept:
            extent = self._scanner.extents[f.pattern]
            if (not final and f.pattern in self._mask and extent is not None and f.end == len(text)
                    and extent.end(text, f.end, False)[1]):
                self._open = f.pattern  # masked up to here; what follows of it is dropped as it comes
        masks = [Found(f.start - shift, f.end - shift, f.pattern) for f in kept if f.pattern in self._mask]
        released = masked(text[shift:release_to], masks, self._placeholders)
        found = [Found(f.start - shift + self._offset, f.end - shift + self._offset, f.pattern) for f in kept]
        self._advance(release_to - shift)
        return Released(released, found)

    def _advance(self, n: int) -> None:
        if n <= 0:
            return
        self._context = self._buffer[n - 1:n]
        self._buffer = self._buffer[n:]
        self._offset += n
