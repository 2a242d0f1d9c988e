"""Property-based fuzzing of the config loader: whatever document comes in, it is parsed or the
problem says why, never a crash. (Settings and a long run: support/fuzz.py.)"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from extproc.config.loader import parse_object
from support.fuzz import fuzz, json_values


@fuzz
@given(st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec"]), json_values),
       st.sampled_from(["LLMProvider", "LLMRoute", "Service", None]))
def test_config_documents_parse_or_say_why(doc, kind):
    if kind is not None:
        doc = {**doc, "kind": kind, "apiVersion": "istio.alibabacloud.com/v1beta1"}
    obj, problems = parse_object(doc, "fuzz.yaml", "1", {})
    assert (obj is not None or problems or kind in (None, "Service")
            or doc.get("kind") not in ("LLMProvider", "LLMRoute"))
    for problem in problems:
        assert problem.file == "fuzz.yaml" and problem.message
