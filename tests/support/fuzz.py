"""Property-based fuzzing's settings and JSON values, shared by the fuzz tests
(tests/unit/*/test_*_fuzz.py). Bounded in CI (a few seconds); for a long run:
LLM_GATEWAY_FUZZ_EXAMPLES=50000 scripts/test tests/unit -k fuzz"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("LLM_GATEWAY_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)
