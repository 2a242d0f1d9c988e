"""What data protection (LLMDataPolicy) costs the ext_proc per request, in process
(`python -m benchmarks data-protection`): the ext_proc's two messages (headers, whole body) for
one chat request of a 4 KiB prompt, no Envoy, no network, the best of several repeats of CPU time
(the machine is shared), for:

- `none`: no policy (the route as every route without one is served);
- `builtins-clean`: a policy with every built-in detector (email, phone, china-resident-id,
  bank-card, ipv4, secret; action mask) on a prompt that holds no value;
- `builtins-ten`: the same on a prompt that holds ten values (all masked).

Issue 26's goal: every built-in on a 4 KiB prompt adds at most 40 µs per request, and a route
without a policy is unchanged (compare `none` with `python -m benchmarks work` of the revision before).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from .measure import best_us

PROVIDER = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: dashscope.aliyuncs.com
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-bench}}}
"""
ALL_BUILTINS = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: bench}
spec:
  rules:
  - name: everything
    detectors: [{builtin: email}, {builtin: phone}, {builtin: china-resident-id}, {builtin: bank-card},
                {builtin: ipv4}, {builtin: secret}]
    action: mask
"""
PROMPT_BYTES = 4096
WORDS = ("please summarize the following report about quarterly sales figures and customer feedback in the "
         "north region with attention to churn pricing support tickets delivery times and product quality "
         "issues raised by our largest accounts during the last review meeting version 2 of the plan").split()
VALUES = ["4111 1111 1111 1111", "jane.roe@example.com", "+86 138 0013 8000", "11010519491231002X", "10.20.30.40",
          "sk-live-0123456789abcdefABCDEF012345", "5500000000000004", "li.lei@example.cn", "13912345678",
          "440304199003074510"]
N = 2000  # requests per timed loop


def prompt(values: list[str], size: int = PROMPT_BYTES, seed: int = 26) -> str:
    """English-like text of `size` bytes with `values` spread through it."""
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS))
    for i, value in enumerate(values):
        words[(i + 1) * len(words) // (len(values) + 1)] = value
    text = " ".join(words)
    return text[:size] if not values else text[:size + 64]


def messages(text: str) -> tuple[bytes, bytes]:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    headers = {":method": "POST", ":authority": "dashscope.aliyuncs.com", ":path": "/", "content-type":
               "application/json", "user-agent": "bench", "accept": "*/*"}
    head = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])))
    body = pb.ProcessingRequest(request_body=pb.HttpBody(
        body=json.dumps({"messages": [{"role": "user", "content": text}]}).encode(), end_of_stream=True))
    return head.SerializeToString(), body.SerializeToString()


def variant_us(with_policy: bool, values: list[str], repeats: int = 7) -> tuple[float, bytes]:
    """CPU µs per request of the ext_proc's messages, and the body it forwarded (for checking)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.config.file_source import load_config
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder

    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "c.yaml"
        config.write_text(PROVIDER + (ALL_BUILTINS if with_policy else ""))
        holder = TableHolder(load_config([config], {}).table)
    processor = ExternalProcessor(holder)
    head, body = messages(prompt(values))
    ex = processor.exchange()
    ex.on_message(head)
    answers, _ = ex.on_message(body)
    forwarded = pb.ProcessingResponse.FromString(answers[-1]).request_body.response.body_mutation.body

    def exchanges() -> int:
        for _ in range(N):
            ex = processor.exchange()
            ex.on_message(head)
            ex.on_message(body)
            ex.on_close()
        return N

    return best_us(exchanges, repeats=repeats, clock=time.process_time), forwarded


def measure(repeats: int = 7) -> dict[str, float]:
    none, plain = variant_us(False, [], repeats)
    clean, clean_body = variant_us(True, [], repeats)
    ten, ten_body = variant_us(True, VALUES, repeats)
    if clean_body != plain or b"[BANK-CARD]" not in ten_body or any(v.encode() in ten_body for v in VALUES):
        raise RuntimeError("the bench's requests were not checked as expected (clean unchanged, ten values masked)")
    return {"none_us": none, "builtins_clean_us": clean, "builtins_ten_us": ten,
            "added_clean_us": clean - none, "added_ten_us": ten - none}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks data-protection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per variant, the best counts (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = measure(args.repeats)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"CPU per request of the ext_proc, a {PROMPT_BYTES} B prompt: no policy {figures['none_us']:.1f} us; "
          f"every built-in, nothing found {figures['builtins_clean_us']:.1f} us (+{figures['added_clean_us']:.1f}); "
          f"ten values masked {figures['builtins_ten_us']:.1f} us (+{figures['added_ten_us']:.1f}). "
          "Goal: +40 us at most with every built-in")
    return 0
