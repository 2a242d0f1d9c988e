"""Header matching: each kind of condition on a header's value, and a header that is absent."""

from __future__ import annotations

import pytest

from support.table_parts import cond


@pytest.mark.parametrize(("condition", "headers", "expected"), [
    pytest.param(cond("user-type", "exact", "subscriber"), {"user-type": "subscriber"}, True, id="exact-equal"),
    pytest.param(cond("user-type", "exact", "subscriber"), {"user-type": "Subscriber"}, False,
                 id="exact-case-sensitive"),
    pytest.param(cond("user-type", "exact", "subscriber"), {"user-type": "subscriber2"}, False, id="exact-longer"),
    pytest.param(cond("user-type", "exact", "subscriber"), {}, False, id="exact-absent"),
    pytest.param(cond("user-type", "exact", ""), {"user-type": ""}, True, id="exact-empty-value"),
    pytest.param(cond("x-tier", "prefix", "gold"), {"x-tier": "gold-plus"}, True, id="prefix-match"),
    pytest.param(cond("x-tier", "prefix", "gold"), {"x-tier": "gold"}, True, id="prefix-whole"),
    pytest.param(cond("x-tier", "prefix", "gold"), {"x-tier": "rose-gold"}, False, id="prefix-not-at-start"),
    pytest.param(cond("x-tier", "prefix", "gold"), {}, False, id="prefix-absent"),
    pytest.param(cond("x-user", "regex", "vip-[0-9]+"), {"x-user": "vip-42"}, True, id="regex-full-match"),
    pytest.param(cond("x-user", "regex", "vip-[0-9]+"), {"x-user": "vip-42x"}, False, id="regex-trailing-text"),
    pytest.param(cond("x-user", "regex", "vip-[0-9]+"), {"x-user": "a-vip-42"}, False, id="regex-leading-text"),
    pytest.param(cond("x-user", "regex", "vip"), {"x-user": "vip\n"}, False, id="regex-trailing-newline"),
    pytest.param(cond("x-user", "regex", "a|b"), {"x-user": "ab"}, False, id="regex-alternation-whole"),
    pytest.param(cond("x-user", "regex", ".*"), {"x-user": ""}, True, id="regex-empty-value"),
    pytest.param(cond("x-user", "regex", ".*"), {}, False, id="regex-absent"),
    pytest.param(cond("x-debug", "present"), {"x-debug": ""}, True, id="present-empty-value"),
    pytest.param(cond("x-debug", "present"), {"x-debug": "1"}, True, id="present"),
    pytest.param(cond("x-debug", "present"), {"x-other": "1"}, False, id="present-absent"),
])
def test_header_condition(condition, headers, expected):
    assert condition.holds(headers) is expected
