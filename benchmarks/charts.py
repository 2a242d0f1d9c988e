"""The request benchmark's PNG: requests/s of each contender at 1 and 16 connections, and CPU per
streamed event when the streaming benchmark ran (matplotlib, installed by scripts/bench)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"bare": "#888888", "floor": "#9bbb59", "gateway": "#2a7ab0", "gateway_cmp": "#4bacc6", "litellm": "#c0504d"}
STREAM_COLORS = ["#888888", "#9bbb59", "#2a7ab0", "#4bacc6"]


def chart_streaming(s: dict, ax) -> None:
    st = s["streaming"]["contenders"]
    names = list(st)
    bars = ax.bar(names, [st[n]["cpu_us_per_event"] for n in names], color=STREAM_COLORS[:len(names)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(f"CPU µs per streamed event (all processes)\n{s['streaming']['streams']} streams × "
                 f"{s['streaming']['events']} events, {s['streaming']['pace_ms']} ms apart")


def chart(s: dict, path: Path) -> None:
    """The summary `s` of scripts/bench as a chart in `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["medians"])
    streaming = "streaming" in s
    fig, axes = plt.subplots(1, 3 if streaming else 2, figsize=(15 if streaming else 10, 4))
    if streaming:
        chart_streaming(s, axes[2])
    for ax, c in zip(axes, (1, 16), strict=False):
        values = [s["medians"][n][c]["rps"] for n in names]
        bars = ax.bar(names, values, color=[COLORS.get(n, "#666666") for n in names])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"requests/s, {c} connection{'s' if c > 1 else ''} ({s['machine']['cores']} cores)")
    fig.suptitle("LLM gateway vs bare Envoy, the ext_proc floor and LiteLLM (same fake provider, medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
