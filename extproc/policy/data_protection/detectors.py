"""Detectors: what sensitive text looks like, as patterns RE2 runs in linear time.

Every detector is one or more `Pattern`s: an RE2 regular expression (RE2 never backtracks, so
the work per byte is bounded whatever the text or the pattern; Python's `re` is quadratic on
an email pattern over a long run of letters), the part of its match that is the sensitive
value, a check of that value where one exists (Luhn for cards, ISO 7064 for resident IDs), and
an extension for values longer than any bounded pattern (a JWT, a private key block).

Patterns run over UTF-8 bytes: positions are byte offsets, and a mask is applied on the bytes.
RE2 has no lookaround, so a pattern that must not start inside a longer run (a card number in
a 24-digit reference) consumes one character before the value (`(?:^|[^0-9])`) and keeps the
value in group 1; the character after the value is checked by the validator.

Each pattern also states the longest span it can examine (`max_len`, context included): a
stream scanner (`extproc.policy.data_protection.scanner.StreamScanner`) holds back only that
much text, so an answer stays incremental.

Built-ins, chosen for few false positives (docs/data-protection.md lists what each catches):
`email`, `phone` (Chinese mobile numbers, and international numbers written with `+`),
`china-resident-id` (18 characters, region, date and checksum), `bank-card` (13 to 19 digits,
issuer digit 2-6, Luhn), `ipv4`, `secret` (provider keys `sk-...`, cloud access keys, GitHub and
Slack tokens, private key blocks, JWTs, bearer tokens).
"""

from __future__ import annotations

import datetime
import functools
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

# The longest span a stream holds back for a pattern whose matches have no bound (a user's
# `ACME-[0-9]+`): its matches are caught whole in prompts, in answers up to this many bytes.
STREAM_HOLD_CAP = 256

Validator = Callable[[bytes, int, int], bool]  # (text, value start, value end) -> is it one?


@dataclass(frozen=True)
class Extension:
    """How a value goes on past its pattern's bounded match: over a class of bytes (the rest of a
    JWT or a key), or to an end marker (a private key block's `-----END ... -----`)."""

    more: bytes  # a regex character class body, e.g. rb"A-Za-z0-9_-": the value goes on over these
    until: bytes | None = None  # a marker that, right after that run, ends the value on its closing "-----"


@dataclass(frozen=True)
class Pattern:
    detector: str  # the name reported (metrics, errors, the access log), e.g. "email"
    regex: str  # RE2 syntax
    group: int = 0  # the value: the whole match, or group 1 (a consumed boundary before it)
    validate: Validator | None = None
    extend: Extension | None = None
    max_len: int = STREAM_HOLD_CAP  # bytes a match can span, the boundary character included
    placeholder: bytes = field(default=b"")  # what a mask writes; "[DETECTOR]" by default
    bounded: bool = True  # its regex never matches more than max_len bytes (a user's `x+` may)

    def __post_init__(self) -> None:
        if not self.placeholder:
            object.__setattr__(self, "placeholder", f"[{self.detector.upper()}]".encode())


def re2_options() -> Any:
    """RE2's defaults (8 MiB per pattern), without RE2 printing a refused pattern to stderr."""
    options = re2.Options()
    options.log_errors = False
    return options


def compile_re2(pattern: str) -> Any:
    """The compiled pattern; raises ValueError naming what RE2 cannot run."""
    try:
        return re2.compile(pattern, re2_options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"RE2 cannot run this pattern ({reason}): RE2 syntax, linear time, no lookaround or "
                         "backreferences") from None


def check_regex(pattern: str) -> str | None:
    """Why RE2 cannot run `pattern` (for a load-time error naming the field), or None."""
    try:
        compiled = compile_re2(pattern)
    except ValueError as exc:
        return str(exc)
    if compiled.search(b"") is not None:
        return "the pattern matches the empty text: it would match everywhere"
    return None


# --- checks -------------------------------------------------------------------------------------

_NOT_DIGITS = bytes(c for c in range(256) if not 0x30 <= c <= 0x39)


def _digits(value: bytes) -> bytes:
    return value.translate(None, _NOT_DIGITS)


def _not_followed(chars: bytes, text: bytes, _start: int, end: int) -> bool:
    return end >= len(text) or text[end] not in chars


def _not_followed_by(chars: bytes) -> Validator:
    """A check that the value is not followed by one of `chars` (picklable: tables go to workers)."""
    return functools.partial(_not_followed, chars)


_DIGITS = b"0123456789"
_ALNUM = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# a digit's ASCII code -> the digit sum of its double (Luhn's every second digit from the right)
_DOUBLED = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def luhn(digits: bytes) -> bool:
    """The Luhn checksum (ISO/IEC 7812) of a string of ASCII digits (translated and summed in C:
    a loop over the digits in Python cost microseconds per candidate)."""
    kept, doubled = digits[::-1][0::2], digits[::-1][1::2]
    return (sum(kept) - 0x30 * len(kept) + sum(doubled.translate(_DOUBLED))) % 10 == 0


def bank_card(text: bytes, start: int, end: int) -> bool:
    """13 to 19 digits with a valid Luhn sum, not one digit repeated, not inside a longer number."""
    if end < len(text) and text[end] in _DIGITS:
        return False
    digits = _digits(text[start:end])
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn(digits)


# GB 11643-1999: weights of the first 17 digits, and the check character by the sum modulo 11
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_WEIGHT_SUM = sum(_ID_WEIGHTS)
_ID_CHECK = b"10X98765432"
# the provinces' codes (the first two digits; GB/T 2260), Hong Kong, Macao, Taiwan and overseas
_ID_REGIONS = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50,
                         51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83, 91})


def resident_id_checksum(value: bytes) -> bool:
    """The 18th character of a China resident identity number from the first 17 digits."""
    if len(value) != 18 or not value[:17].isdigit():
        return False
    total: int = sum(map(operator.mul, value[:17], _ID_WEIGHTS)) - 0x30 * _ID_WEIGHT_SUM
    return _ID_CHECK[total % 11] == value[17:18].upper()[0]


def china_resident_id(text: bytes, start: int, end: int) -> bool:
    """A real region, a real date of birth, and the checksum; not inside a longer word or number."""
    if end < len(text) and text[end] in _ALNUM:
        return False
    value = text[start:end]
    if int(value[:2]) not in _ID_REGIONS:
        return False
    try:
        datetime.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    return resident_id_checksum(value)


def phone(text: bytes, start: int, end: int) -> bool:
    """8 to 15 digits in all (E.164's most), not followed by another digit."""
    if end < len(text) and text[end] in _DIGITS:
        return False
    return 8 <= len(_digits(text[start:end])) <= 15


def ipv4(text: bytes, _start: int, end: int) -> bool:
    """Not followed by another digit or a further `.digit` (then it is a longer dotted number)."""
    if end < len(text) and text[end] in _DIGITS:
        return False
    return not (end + 1 < len(text) and text[end] == 0x2E and text[end + 1] in _DIGITS)


# --- the built-ins ------------------------------------------------------------------------------

_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = "[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?"  # labels of up to 32: a bounded span for streams
_TOKEN_TAIL = b"A-Za-z0-9_-"

BUILTINS: dict[str, tuple[Pattern, ...]] = {
    "email": (Pattern(
        "email", rf"(?i)(?:^|[^a-z0-9._%+-])([a-z0-9._%+-]{{1,64}}@{_LABEL}(?:\.{_LABEL}){{0,3}}\.[a-z]{{2,24}})",
        group=1, max_len=1 + 64 + 1 + 4 * 33 + 24),),
    "phone": (Pattern(
        "phone", r"(?:^|[^0-9A-Za-z+])((?:(?:\+|00)86[ -]?)?1[3-9][0-9](?:[0-9]{8}|[ -][0-9]{4}[ -][0-9]{4})"
                 r"|\+[1-9](?:[ .()-]{0,2}[0-9]){7,14})",
        group=1, validate=phone, max_len=1 + 14 * 3 + 2 + 1),),
    "china-resident-id": (Pattern(
        "china-resident-id",
        r"(?:^|[^0-9A-Za-z])([1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}"
        r"[0-9Xx])", group=1, validate=china_resident_id, max_len=1 + 18 + 1),),
    "bank-card": (Pattern(
        "bank-card", r"(?:^|[^0-9A-Za-z])([2-6][0-9]{12,18}|[2-6][0-9]{3}(?:[ -][0-9]{4}){2,3}(?:[ -]?[0-9]{1,3})?"
                     r"|3[47][0-9]{2}[ -][0-9]{6}[ -][0-9]{5})",
        group=1, validate=bank_card, max_len=1 + 19 + 4 + 2),),
    "ipv4": (Pattern(
        "ipv4", rf"(?:^|[^0-9A-Za-z.])({_OCTET}(?:\.{_OCTET}){{3}})", group=1, validate=ipv4, max_len=1 + 15 + 2),),
    "secret": (
        # provider keys: OpenAI, Anthropic, DashScope, Moonshot, DeepSeek... (sk-...)
        Pattern("secret", r"(?:^|[^A-Za-z0-9_-])(sk-[A-Za-z0-9_-]{20})", group=1, extend=Extension(_TOKEN_TAIL),
                max_len=1 + 23),
        # cloud access key IDs: AWS (AKIA/ASIA...), Alibaba Cloud (LTAI...), Google API keys
        Pattern("secret", r"(?:^|[^A-Za-z0-9])((?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}|LTAI[0-9A-Za-z]{12,20}"
                          r"|AIza[0-9A-Za-z_-]{35})", group=1, validate=_not_followed_by(_ALNUM), max_len=1 + 39 + 1),
        # GitHub and Slack tokens
        Pattern("secret", r"(?:^|[^A-Za-z0-9_])((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}"
                          r"|xox[abposr]-[A-Za-z0-9-]{10})", group=1, extend=Extension(_TOKEN_TAIL), max_len=1 + 40),
        # private key blocks (PEM, OpenSSH, PGP), to their end line
        Pattern("secret", r"(-----BEGIN (?:[A-Z0-9]{1,12} ){0,3}PRIVATE KEY(?: BLOCK)?-----)", group=1,
                extend=Extension(b"A-Za-z0-9+/=\r\n", until=b"-----END "), max_len=60),
        # JSON Web Tokens: two base64url parts that start as JSON objects, and a signature
        Pattern("secret", r"(?:^|[^A-Za-z0-9_-])(eyJ[A-Za-z0-9_-]{8,100}\.eyJ[A-Za-z0-9_-]{8,100}\.[A-Za-z0-9_-]{8})",
                group=1, extend=Extension(b"A-Za-z0-9_.-"), max_len=1 + 224),
        # bearer tokens: the token after the word (the word itself is kept)
        Pattern("secret", r"(?:^|[^A-Za-z0-9])(?i:bearer)[ \t]{1,8}([A-Za-z0-9._~+/-]{20})", group=1,
                extend=Extension(b"A-Za-z0-9._~+/=-"), max_len=1 + 6 + 8 + 20),
    ),
}
BUILTIN_NAMES = tuple(BUILTINS)
BuiltinName = Literal["email", "phone", "china-resident-id", "bank-card", "ipv4", "secret"]


def regex_pattern(name: str, regex: str) -> Pattern:
    """A user's pattern: its whole match is the value; RE2 checked it at load time."""
    longest = _longest(regex)
    return Pattern(name, regex, max_len=longest or STREAM_HOLD_CAP, bounded=longest is not None)


def keywords_pattern(name: str, keywords: Sequence[str]) -> Pattern:
    """Any of the words, as written or in another case, anywhere (CJK text has no word boundaries)."""
    longest = max(len(k) for k in keywords)
    alternatives = "|".join(re2.escape(k) for k in sorted(set(keywords), key=len, reverse=True))
    return Pattern(name, f"(?i)(?:{alternatives})", max_len=4 * longest)


def _longest(regex: str) -> int | None:
    """Bytes a user's pattern can match at most (4 per character: UTF-8), where Python's parser
    can tell (it reads RE2's syntax but for a few escapes) and it is within the cap; else None."""
    try:
        widest = 4 * int(re._parser.parse(regex).getwidth()[1])  # type: ignore[attr-defined]
    except Exception:
        return None
    return widest if widest <= STREAM_HOLD_CAP else None
