"""Model servers' metrics as loads: vLLM's names (old and new), other servers', LoRA info, and
scrapes bounded in time and size against a simulated server."""

from __future__ import annotations

import asyncio

import pytest

from extproc.dataplane.endpoint_scraper import EndpointScraper, fetch_metrics, parse_load
from extproc.demo.model_server import ModelServer
from extproc.policy.endpoint_state import EndpointState
from extproc.policy.table import Pool

VLLM = b"""# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="qwen"} 3.0
vllm:num_requests_running{model_name="qwen"} 5.0
vllm:kv_cache_usage_perc{model_name="qwen"} 0.42
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="x"} 1.6e9
vllm:num_requests_waiting_bucket{le="1"} 99.0
"""

CASES = [
    pytest.param(VLLM, (3.0, 5.0, 0.42, {"sql", "chat"}, 4), id="vllm-latest-lora-info-wins"),
    pytest.param(b"vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.5\n",
                 (1.0, 2.0, 0.5, set(), 0), id="vllm-old-kv-name"),
    pytest.param(b'vllm:num_requests_waiting{model_name="a"} 1\nvllm:num_requests_waiting{model_name="b"} 2\n',
                 (3.0, 0.0, 0.0, set(), 0), id="series-added-up"),
    pytest.param(b"sglang:num_queue_reqs 4\nsglang:num_running_reqs 1\nsglang:token_usage 0.3\n",
                 (4.0, 1.0, 0.3, set(), 0), id="sglang"),
    pytest.param(b"tgi_queue_size 2\ntgi_batch_current_size 7\n", (2.0, 7.0, 0.0, set(), 0), id="tgi"),
    pytest.param(b"vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 85\n", (0.0, 0.0, 0.85, set(), 0),
                 id="a-percentage-as-0-to-100"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_load(text, expected):
    load = parse_load(text, at=5.0, sent_before=2)
    assert load is not None
    assert (load.waiting, load.running, load.kv_usage, set(load.adapters), load.max_adapters) == expected
    assert (load.at, load.sent_before) == (5.0, 2)


@pytest.mark.parametrize("text", [b"", b"\x00\xffgarbage {{{", b"# HELP vllm:num_requests_waiting only help\n",
                                  b"process_cpu_seconds_total 3\n", b"vllm:num_requests_waiting not-a-number\n"])
def test_no_load_in_other_text(text):
    assert parse_load(text, 0.0) is None


def test_scrapes_are_bounded_in_time_and_size_and_keep_the_last_good_load():
    async def run():
        server = await ModelServer("m", host="127.0.0.1").start()
        try:
            assert b"vllm:num_requests_waiting" in await fetch_metrics(server.address)
            server.metrics_mode = "huge"
            with pytest.raises(ValueError, match="content-length"):
                await fetch_metrics(server.address, limit=1 << 20)
            server.metrics_mode = "slow"
            with pytest.raises(TimeoutError):
                await fetch_metrics(server.address, timeout_s=0.2)
            server.metrics_mode = "absent"
            with pytest.raises(ValueError, match="status"):
                await fetch_metrics(server.address)
            # through the scraper: a good load, then garbage: the good one stays (it turns stale by age)
            state = EndpointState()
            pool = Pool("p.default.inferencepool", "InferencePool", "default/p", "http", (server.address,))
            scraper = EndpointScraper(state, lambda: {pool.host: pool}, interval_s=0.05, timeout_s=0.3)
            server.metrics_mode = "ok"
            server.reported = {"waiting": 7, "running": 1, "kv": 0.25}
            task = asyncio.create_task(scraper.run())
            for _ in range(100):
                await asyncio.sleep(0.02)
                if server.address in state.loads:
                    break
            good = state.loads[server.address]
            assert (good.waiting, good.kv_usage) == (7.0, 0.25)
            server.metrics_mode = "garbage"
            scrapes = server.metrics_scrapes
            while server.metrics_scrapes < scrapes + 3:
                await asyncio.sleep(0.02)
            assert state.loads[server.address].waiting == 7.0 and "no load metrics" in scraper.failures[server.address]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await server.stop()

    asyncio.run(run())
