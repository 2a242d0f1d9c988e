"""The data-protection bench part (issue 26) measures the real path: the clean prompt forwarded
unchanged, the ten values masked, each variant timed (a smoke run, one repeat)."""

from __future__ import annotations

from benchmarks import data_protection


def test_the_prompts_are_4_kib_with_none_or_ten_values():
    assert len(data_protection.prompt([]).encode()) == data_protection.PROMPT_BYTES
    text = data_protection.prompt(data_protection.VALUES)
    assert all(value in text for value in data_protection.VALUES)


def test_a_smoke_run_measures_every_variant():
    figures = data_protection.measure(repeats=1)  # raises if a request was not checked as expected
    assert set(figures) == {"none_us", "builtins_clean_us", "builtins_ten_us", "added_clean_us", "added_ten_us"}
    assert all(figures[k] > 0 for k in ("none_us", "builtins_clean_us", "builtins_ten_us"))


def test_the_command_runs(capsys):
    from benchmarks.__main__ import main

    assert main(["data-protection", "--repeats", "1"]) == 0
    assert "ten values masked" in capsys.readouterr().out
