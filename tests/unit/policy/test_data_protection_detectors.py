"""The built-in detectors, one table each: what they catch (true positives), what they leave
alone (false positives they must not raise), and their checksums; user patterns checked at
load time. A value found is given as the exact text a mask replaces."""

from __future__ import annotations

import pytest

from extproc.policy.data_protection.detectors import (
    BUILTINS,
    check_regex,
    keywords_pattern,
    luhn,
    regex_pattern,
    resident_id_checksum,
)
from extproc.policy.data_protection.scanner import Scanner
from support.key_blocks import key_block


def values(detector: str, text: str) -> list[str]:
    raw = text.encode()
    found = Scanner(BUILTINS[detector]).find(raw)
    return [raw[f.start:f.end].decode() for f in sorted(found)]


PEM = key_block("rsa")  # made at test time
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")


@pytest.mark.parametrize(("detector", "text", "expected"), [
    # email
    ("email", "write to john.doe@example.com today", ["john.doe@example.com"]),
    ("email", "Name <USER+tag@Mail.Example.CO.UK>", ["USER+tag@Mail.Example.CO.UK"]),
    ("email", "a@b.cn,c_d@e-f.org", ["a@b.cn", "c_d@e-f.org"]),
    ("email", "user@localhost, @example.com, john@, a@b.c", []),
    # phone: Chinese mobile numbers, international ones written with +
    ("phone", "call 13800138000.", ["13800138000"]),
    ("phone", "手机：138-0013-8000 或 +86 139 1234 5678", ["138-0013-8000", "+86 139 1234 5678"]),
    ("phone", "008613800138000", ["008613800138000"]),
    ("phone", "office +1 415 555 2671, London +44 20 7946 0958", ["+1 415 555 2671", "+44 20 7946 0958"]),
    ("phone", "12345678901 (starts 12), 1380013800 (10 digits), 138001380001 (12 digits)", []),
    ("phone", "order ORD13800138000, ticket 213800138000, x+1 2", []),
    # china-resident-id: 18 characters, a real region and date, the ISO 7064 checksum
    ("china-resident-id", "身份证号 11010519491231002X。", ["11010519491231002X"]),
    ("china-resident-id", "id 440304199003074510 and 310104200002291236", ["440304199003074510",
                                                                              "310104200002291236"]),
    ("china-resident-id", "11010519491231002x", ["11010519491231002x"]),
    ("china-resident-id", "440304199003074511", []),  # the checksum fails
    ("china-resident-id", "990304199003074518", []),  # no such region (99)
    ("china-resident-id", "440304199002304518", []),  # February the 30th
    ("china-resident-id", "a440304199003074510 4403041990030745101", []),  # inside a word, a longer number
    # bank-card: 13 to 19 digits, issuer 2-6, Luhn
    ("bank-card", "card 4111 1111 1111 1111 exp 12/29", ["4111 1111 1111 1111"]),
    ("bank-card", "4111-1111-1111-1111; 5500000000000004; 378282246310005",
     ["4111-1111-1111-1111", "5500000000000004", "378282246310005"]),
    ("bank-card", "Amex 3782 822463 10005, UnionPay 6214830000000000007",
     ["3782 822463 10005", "6214830000000000007"]),
    ("bank-card", "2221000000000009 6225880000000001 3530111300000005",
     ["2221000000000009", "6225880000000001", "3530111300000005"]),
    ("bank-card", "4111111111111112", []),  # the Luhn sum fails
    ("bank-card", "1234567812345670 (issuer 1), 4444444444444448 ok? 0000000000000000", ["4444444444444448"]),
    ("bank-card", "ref 41111111111111110000, 4111 1111 1111 1111 1111 2", []),  # longer numbers
    ("bank-card", "timestamp 1700000000000, phone 13800138000", []),
    # ipv4
    ("ipv4", "hosts 10.0.0.1 and 192.168.1.255.", ["10.0.0.1", "192.168.1.255"]),
    ("ipv4", "dns=8.8.8.8;", ["8.8.8.8"]),
    ("ipv4", "256.1.1.1 1.2.3 1.2.3.4.5 pi 3.14159 v1.2.3.4", []),
    # secret: provider keys, cloud access keys, tokens, private keys, JWTs, bearer tokens
    ("secret", "key=sk-proj-Abc123_def456-GHI789jkl012MNO", ["sk-proj-Abc123_def456-GHI789jkl012MNO"]),
    ("secret", "DASHSCOPE_API_KEY=sk-0123456789abcdef0123456789abcdef", ["sk-0123456789abcdef0123456789abcdef"]),
    ("secret", "aws AKIAIOSFODNN7EXAMPLE ali LTAI5tBcc9yqEXAMPLEKEY", ["AKIAIOSFODNN7EXAMPLE",
                                                                     "LTAI5tBcc9yqEXAMPLEKEY"]),
    ("secret", "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", ["AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe"]),
    ("secret", "ghp_0123456789abcdefghijABCDEFGHIJ012345 xoxb-1234567890-abcdef",
     ["ghp_0123456789abcdefghijABCDEFGHIJ012345", "xoxb-1234567890-abcdef"]),
    ("secret", f"my key:\n{PEM}\nthanks", [PEM]),
    ("secret", f"token {JWT} end", [JWT]),
    ("secret", "Authorization: Bearer abcDEF123456ghiJKL7890mnoPQR==", ["abcDEF123456ghiJKL7890mnoPQR=="]),
    ("secret", "task-abcdefghijklmnopqrstuvwxyz, sk-short, AKIAIOSFODNN7EXAMPL, bearer token, eyJhbGciOi", []),
    ("secret", "risk-0123456789abcdef0123456789 AKIAIOSFODNN7EXAMPLE1", []),  # inside words
])
def test_builtin_detectors(detector, text, expected):
    assert values(detector, text) == expected


def test_a_private_key_block_without_its_end_line_is_masked_to_the_end_of_its_body():
    text = PEM.split("-----END")[0] + "that was my key"
    (value,) = values("secret", text)
    assert value.startswith("-----BEGIN RSA PRIVATE KEY-----") and value.endswith(PEM.splitlines()[2] + "\nthat")


@pytest.mark.parametrize(("digits", "valid"), [
    ("4111111111111111", True), ("79927398713", True), ("4111111111111112", False), ("0", True), ("18", True),
])
def test_luhn(digits, valid):
    assert luhn(digits.encode()) is valid


@pytest.mark.parametrize(("number", "valid"), [
    ("11010519491231002X", True), ("11010519491231002x", True), ("440304199003074510", True),
    ("440304199003074519", False), ("11010519491231002", False), ("1101051949123100XX", False),
])
def test_resident_id_checksum(number, valid):
    assert resident_id_checksum(number.encode()) is valid


def test_user_regex_and_keywords():
    scanner = Scanner([regex_pattern("acme-ticket", "ACME-[0-9]{6}"),
                       keywords_pattern("projects", ["Project Aurora", "机密"])])
    text = "see ACME-123456 (not ACME-12345) about project aurora, 此文件机密".encode()
    found = [(text[f.start:f.end].decode(), scanner.patterns[f.pattern].detector) for f in sorted(scanner.find(text))]
    assert found == [("ACME-123456", "acme-ticket"), ("project aurora", "projects"), ("机密", "projects")]
    assert [p.placeholder for p in scanner.patterns] == [b"[ACME-TICKET]", b"[PROJECTS]"]


@pytest.mark.parametrize(("pattern", "problem"), [
    ("(?=secret)x", "RE2 cannot run this pattern (invalid perl operator: (?=)"),
    (r"(a)\1", "RE2 cannot run this pattern (invalid escape sequence: \\1)"),
    ("(?<!a)b", "RE2 cannot run this pattern"),
    ("[unclosed", "RE2 cannot run this pattern (missing ]: [unclosed)"),
    ("a{2000}", "RE2 cannot run this pattern (invalid repetition size: {2000})"),
    ("x*", "the pattern matches the empty text"),
    ("ACME-[0-9]{6}", None),
    ("(a+)+$", None),  # catastrophic for a backtracking engine, linear for RE2
])
def test_patterns_re2_cannot_run_are_named(pattern, problem):
    found = check_regex(pattern)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found
