"""Running detectors over text: a whole text (a prompt), or a stream of pieces (an answer).

`Scanner.find` costs one RE2 pass over a text that holds nothing (the common case): all the
patterns combined into one alternation (RE2 runs it as one automaton). Where that pass finds a
candidate, an RE2 set anchored there says which patterns start at it, and only those are
matched (anchored), checked and extended: a few steps per value, each bounded by the pattern's
`max_len` (a value's extension resumes nothing: a pattern's values never overlap). Bounded work
per byte, whatever the text or the patterns.

`StreamScanner` is the same over a stream: a match may be split across pieces (a card number
over two events), so it holds back the last `hold` bytes (the longest span any pattern can
examine) and releases the rest, masked; a value that goes on past a piece (a private key
block) keeps being masked as it comes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import re2

from .detectors import Extension, Pattern, compile_re2, re2_options

Spans = Callable[[bytes, int, int], "list[tuple[int, int]] | None"]  # (text, pos, endpos) -> group spans


def _spans(compiled: Any, anchored: bool) -> Spans:
    """A compiled pattern's match as its groups' spans, or None. google-re2's Python wrapper makes
    a generator and a match object per call (about 1 µs, more than RE2's own match on a short
    span): its C++ match is called directly where the wrapper exposes it, else the wrapper."""
    regexp, anchors = getattr(compiled, "_regexp", None), getattr(re2, "_Anchor", None)
    if regexp is not None and anchors is not None and hasattr(regexp, "Match"):
        raw, anchor = regexp.Match, anchors.ANCHOR_START if anchored else anchors.UNANCHORED

        def direct(text: bytes, pos: int, endpos: int) -> list[tuple[int, int]] | None:
            spans: list[tuple[int, int]] = raw(anchor, text, pos, endpos)
            return None if spans[0][0] < 0 else spans
        return direct
    call = compiled.match if anchored else compiled.search

    def wrapped(text: bytes, pos: int, endpos: int) -> list[tuple[int, int]] | None:
        match = call(text, pos, endpos)
        return None if match is None else [match.span(g) for g in range(compiled.groups + 1)]
    return wrapped


class Found(NamedTuple):
    start: int  # byte offsets of the value in the text
    end: int
    pattern: int  # index into the scanner's patterns


class Scanner:
    """A set of patterns, compiled once per config."""

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = tuple(patterns)
        self._compiled = [compile_re2(p.regex) for p in self.patterns]
        self._anchored = [_spans(c, anchored=True) for c in self._compiled]
        self.extents = [_Extent(p.extend) if p.extend is not None else None for p in self.patterns]
        self.hold = max((p.max_len for p in self.patterns), default=0)
        self._any: Any = None  # every pattern in one alternation: where the next value starts
        self._set: Any = None  # the bounded patterns as an anchored set: which of them start there
        self._unbounded: tuple[int, ...] = ()  # patterns the set cannot rule out: always tried
        self._bounded: list[int] = []  # the set's index -> the pattern's
        if len(self.patterns) > 1:
            options = re2_options()
            options.never_capture = True
            try:  # too big for RE2's memory bound: each pattern scans the text instead
                self._any = re2.compile("|".join(f"(?:{p.regex})" for p in self.patterns), options)
                self._next = _spans(self._any, anchored=False)
                bounded = [i for i, p in enumerate(self.patterns) if p.bounded]
                if bounded:
                    self._set = re2.Set.MatchSet(options)
                    for i in bounded:
                        if self._set.Add(self.patterns[i].regex) != bounded.index(i):
                            raise re2.error("set index")
                    self._set.Compile()
                    self._bounded = bounded
                self._unbounded = tuple(i for i, p in enumerate(self.patterns) if not p.bounded)
            except re2.error:
                self._any = self._set = None

    def __reduce__(self) -> tuple[type[Scanner], tuple[tuple[Pattern, ...]]]:
        """Pickled as its patterns, compiled again where it is loaded (a worker process gets each
        routing table pickled; RE2's objects and the direct match functions do not pickle)."""
        return (Scanner, (self.patterns,))

    def find(self, text: bytes, final: bool = True) -> list[Found]:
        """Every value in `text` (in order of where its match starts). Not `final` (a stream): a
        value that may go on past the text ends where the text does.

        One RE2 pass finds where the next candidate of any pattern starts; there the set says
        which patterns match (anchored, within `hold` bytes), and only those are matched, checked
        and extended. A text without values is one pass; each value adds a few bounded steps."""
        if self._any is None:
            found: list[Found] = []
            for index, compiled in enumerate(self._compiled):
                self._scan(index, compiled, text, 0, found, final)
            return found
        found = []
        covered = [0] * len(self.patterns)  # per pattern: where its last value ended (its values never overlap)
        search, patterns, anchored, extents = self._next, self.patterns, self._anchored, self.extents
        limit, pos = len(text), 0
        while pos <= limit:
            candidate = search(text, pos, limit)
            if candidate is None:
                break
            start = candidate[0][0]
            for index in self._starting(text, start):
                if start < covered[index]:
                    continue
                spans = anchored[index](text, start, limit)
                if spans is None:
                    continue
                pattern = patterns[index]
                value_start, value_end = spans[pattern.group]
                if value_end <= value_start or (pattern.validate is not None
                                                and not pattern.validate(text, value_start, value_end)):
                    continue
                extent = extents[index]
                if extent is not None:
                    value_end = extent.end(text, value_end, final)[0]
                found.append(Found(value_start, value_end, index))
                covered[index] = max(spans[0][1], value_end)
            pos = start + 1
        return found

    def _starting(self, text: bytes, start: int) -> Sequence[int]:
        """The patterns that may match at `start`: the set's answer on the next `hold` bytes (the
        bounded patterns cannot reach further), and every unbounded one. An empty answer (RE2's set
        out of memory, or only unbounded patterns there): all of them."""
        if self._set is None:
            return range(len(self.patterns))
        hits = self._set.Match(text[start:start + self.hold])
        if not hits:
            return range(len(self.patterns))
        bounded = self._bounded
        if len(hits) == 1 and not self._unbounded:
            return (bounded[hits[0]],)
        return sorted([*(bounded[h] for h in hits), *self._unbounded])

    def _scan(self, index: int, compiled: Any, text: bytes, pos: int, found: list[Found], final: bool) -> None:
        """One pattern over the whole text (when the patterns could not be combined)."""
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
        if not found_now:  # nothing (the common case): all but the last `hold` bytes go
            self._advance(cut - shift)
            return Released(text[shift:cut], [])
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
