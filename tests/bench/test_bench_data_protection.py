"""The data-protection bench part (issue 26) measures the real path: the clean prompt forwarded
unchanged, the ten values masked, a checked stream masked, each variant timed (a smoke run, one
repeat)."""

from __future__ import annotations

from benchmarks import data_protection


def test_the_prompts_are_4_kib_with_none_or_ten_values():
    assert len(data_protection.prompt([]).encode()) == data_protection.PROMPT_BYTES
    text = data_protection.prompt(data_protection.VALUES)
    assert all(value in text for value in data_protection.VALUES)


def test_a_smoke_run_measures_every_variant():
    figures = data_protection.measure(repeats=1)  # raises if a request was not checked as expected
    assert set(figures) == {"none_us", "builtins_clean_us", "builtins_ten_us", "added_clean_us", "added_ten_us",
                            "stream_clean_us_per_event", "stream_values_us_per_event", "stream_unchecked_us_per_event"}
    assert all(figures[k] > 0 for k in ("none_us", "builtins_clean_us", "builtins_ten_us",
                                        "stream_clean_us_per_event", "stream_values_us_per_event"))
    assert figures["stream_unchecked_us_per_event"] == 0  # the bench checked that nothing reaches the ext_proc


def test_the_streamed_variant_checks_what_it_measures():
    """A stream with values comes out masked, one without unchanged; a request without
    responses.check is not marked (else the bench raises)."""
    assert data_protection.streamed_us(True, repeats=1) > 0
    chunks = data_protection._stream_chunks(True)
    assert len(chunks) == data_protection.STREAM_EVENTS + 1


def test_the_command_runs(capsys):
    from benchmarks.__main__ import main

    assert main(["data-protection", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ten values masked" in out and "CPU per streamed event of the ext_proc, answers checked" in out


def test_the_whole_process_streamed_variant_runs():
    """A short run of `--streams`: both gateways stream every event (too few for CPU figures that
    mean anything: the clock's ticks are 10 ms)."""
    result = data_protection.streams_under_load(rounds=1, repeats=1, streams=2, events=20, pace_ms=1)
    assert set(result["contenders"]) == {"unchecked", "checked"}
    for figures in result["contenders"].values():
        assert figures["events_missing"] == 0 and figures["cpu_us_per_event"] >= 0
