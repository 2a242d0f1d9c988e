"""The scanner: all detectors over a text (the one-pass prefilter, masks, overlaps), bounded
work on pathological input, and the stream scanner of phase 2 (answers): a value split over
pieces is still caught, only `hold` bytes are held back, and any split of a text gives what
the whole text gives."""

from __future__ import annotations

import random
import signal

import pytest

from extproc.policy.data_protection.detectors import BUILTINS, keywords_pattern, regex_pattern
from extproc.policy.data_protection.scanner import Scanner, StreamScanner, masked
from support.key_blocks import key_block

ALL = [p for patterns in BUILTINS.values() for p in patterns]
PLACEHOLDERS = [p.placeholder for p in ALL]
PEM = key_block("pkcs8")  # made at test time
TEXT = ("Dear support, my card 4111 1111 1111 1111 was charged twice. Reach me at jane.roe@example.com or "
        "+86 138 0013 8000; my ID is 11010519491231002X. Server 10.20.30.40 uses key sk-proj-0123456789abcdefghij"
        f"KLMN and this one:\n{PEM}\nThanks!")
MASKED = ("Dear support, my card [BANK-CARD] was charged twice. Reach me at [EMAIL] or [PHONE]; my ID is "
          "[CHINA-RESIDENT-ID]. Server [IPV4] uses key [SECRET] and this one:\n[SECRET]\nThanks!")


def mask_all(scanner: Scanner, text: bytes) -> bytes:
    return masked(text, scanner.find(text), [p.placeholder for p in scanner.patterns])


def test_every_builtin_found_and_masked_in_one_text():
    assert mask_all(Scanner(ALL), TEXT.encode()).decode() == MASKED


def test_a_text_without_values_costs_one_pass_and_finds_nothing():
    clean = ("The quarterly report covers sales in the north region, version 2.1, "
             "with 12 customers and 3 open tickets. ") * 40
    assert Scanner(ALL).find(clean.encode()) == []


def test_overlapping_values_are_masked_as_one():
    scanner = Scanner([keywords_pattern("a", ["secret plan"]), keywords_pattern("b", ["plan b"])])
    assert mask_all(scanner, b"the secret plan b is out") == b"the [A] is out"


def test_a_candidate_failing_its_check_does_not_hide_a_later_value():
    # the first 16 digits fail Luhn; the card after them is still found
    assert mask_all(Scanner(ALL), b"4111111111111112 then 4111111111111111") == b"4111111111111112 then [BANK-CARD]"


def test_values_are_byte_offsets_in_utf8_and_masks_keep_it_valid():
    text = "电子邮件：张伟@例子 no; zhang.wei@example.cn，银行卡 6214830000000000007。".encode()
    out = mask_all(Scanner(ALL), text).decode()
    assert out == "电子邮件：张伟@例子 no; [EMAIL]，银行卡 [BANK-CARD]。"


def _guard(seconds: int):
    """Fails a test that would not end (quadratic or worse work); no timing is asserted."""
    def expired(*_):
        raise AssertionError(f"scanning took more than {seconds}s: not linear")
    signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)


@pytest.mark.parametrize("text", [
    b"a" * (1 << 20),  # an email's local part that never meets an @: quadratic for a backtracking engine
    b"1" * (1 << 20),  # a digit run for the card, ID and phone detectors
    b"1." * (1 << 19),  # a dotted run for ipv4
    b"eyJaaaaaaaaaa.eyJaaaaaaaaaa.aaaaaaaaaa" * (1 << 15),  # JWT-shaped pieces glued together
    b"-----BEGIN PRIVATE KEY-----\n" * (1 << 15),  # block headers without end lines
    b"sk-" + b"a" * (1 << 20),
])
def test_pathological_prompts_are_scanned_in_linear_time(text):
    scanner = Scanner([*ALL, regex_pattern("nested", "(a+)+b"), keywords_pattern("k", ["aaaa" * 8 + "b"])])
    _guard(60)
    try:
        found = scanner.find(text)
    finally:
        signal.alarm(0)
    assert all(f.end > f.start for f in found)


def test_the_hold_is_the_longest_span_a_pattern_examines():
    assert Scanner(BUILTINS["china-resident-id"]).hold == 20
    assert Scanner(ALL).hold == max(p.max_len for p in ALL) <= 256
    assert Scanner([regex_pattern("t", "ACME-[0-9]{6}")]).hold == 4 * 11
    assert Scanner([regex_pattern("t", "ACME-[0-9]+")]).hold == 256  # unbounded: the cap


def stream(scanner: Scanner, pieces: list[bytes], mask: bool = True) -> tuple[bytes, list, list[bytes]]:
    """Every piece fed in order: what was released, what was found, and what each feed released."""
    s = StreamScanner(scanner, frozenset(range(len(scanner.patterns))) if mask else frozenset())
    out, found, releases = [], [], []
    for piece in pieces:
        released = s.feed(piece)
        out.append(released.text)
        releases.append(released.text)
        found.extend(released.found)
    last = s.close()
    out.append(last.text)
    found.extend(last.found)
    return b"".join(out), found, releases


def test_a_card_split_over_two_events_is_still_masked():
    scanner = Scanner(ALL)
    text, found, _ = stream(scanner, [b"my card is 4111 1111 ", b"1111 1111, thanks"])
    assert text == b"my card is [BANK-CARD], thanks"
    assert [scanner.patterns[f.pattern].detector for f in found] == ["bank-card"]


@pytest.mark.parametrize("seed", range(12))
def test_any_split_gives_what_the_whole_text_gives(seed):
    scanner = Scanner(ALL)
    data = TEXT.encode()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    text, found, _ = stream(scanner, pieces)
    assert text.decode() == MASKED
    assert sorted((f.start, f.end) for f in found) == sorted((f.start, f.end) for f in scanner.find(data))


def test_byte_by_byte_too():
    text, _, _ = stream(Scanner(ALL), [bytes([b]) for b in TEXT.encode()])
    assert text.decode() == MASKED


def test_only_hold_bytes_are_held_back():
    scanner = Scanner(BUILTINS["bank-card"])
    words = b"lorem ipsum dolor sit amet " * 20
    _, _, releases = stream(scanner, [words, words])
    assert len(releases[0]) == len(words) - scanner.hold  # the rest waits for more text
    assert len(releases[0]) + len(releases[1]) == 2 * len(words) - scanner.hold


def test_a_private_key_block_over_many_events_is_masked_as_it_comes():
    scanner = Scanner(ALL)
    data = f"here:\n{PEM}\ndone".encode()
    pieces = [data[i:i + 7] for i in range(0, len(data), 7)]
    text, _, releases = stream(scanner, pieces)
    assert text == b"here:\n[SECRET]\ndone"
    assert all(b"MIIE" not in r and b"Mz" not in r for r in releases)


def test_found_but_not_masked_when_the_rule_only_logs():
    scanner = Scanner(ALL)
    text, found, _ = stream(scanner, [b"mail jane@", b"example.com now"], mask=False)
    assert text == b"mail jane@example.com now" and len(found) == 1
