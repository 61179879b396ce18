"""Draw the client benchmark's figures as a PNG: rates, and CPU per message.

    python bench/bench_client.py --rounds 3 --json client.json
    python bench/chart_client.py client.json docs/benchmarks-client.png

Reads what ``bench_client.py --json`` wrote and draws, per sender, the median
over the rounds of messages per second (left, as a ratio to txstarttls on
one connection, the way the targets are stated) and of client CPU per message
(right). Needs matplotlib (``pip install matplotlib``); nothing else in the
project does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# Senders in the order of the benchmark's table; connection-per-message ones
# are drawn in a panel of their own (their rates are 10x smaller).
PIPELINED = (
    "txstarttls-1",
    "aiosmtplib-1",
    "smtplib-1",
    "twisted-floor",
    "txstarttls-8",
    "aiosmtplib-8",
)
PER_CONNECTION = ("txstarttls-conn", "smtplib-conn", "twisted-sendmail", "tls-anchor")
OURS = "#1f6f8b"
OTHERS = "#9aa5ad"


def medians(record: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per sender: the median over the rounds of rate and CPU per message."""
    by_sender: dict[str, list[dict[str, Any]]] = {}
    for round_ in record:
        for result in round_["results"]:
            by_sender.setdefault(result["sender"], []).append(result)
    return {
        sender: {
            "rate": statistics.median(r["rate"] for r in results),
            "cpu_us": statistics.median(
                1e6 * r["client_cpu"] / r["messages"] for r in results
            ),
        }
        for sender, results in by_sender.items()
    }


def draw(figures: dict[str, dict[str, float]], rounds: int, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rates, per_conn, cpu) = plt.subplots(
        1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [6, 3, 6]}
    )
    anchor = figures.get("txstarttls-1", {}).get("rate")
    _bars(rates, figures, PIPELINED, "rate", "messages per second")
    if anchor:
        for index, sender in enumerate(s for s in PIPELINED if s in figures):
            ratio = figures[sender]["rate"] / anchor
            rates.annotate(
                f"{ratio:.2f}x",
                (index, figures[sender]["rate"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    rates.set_title("one and eight connections (ratio to txstarttls-1)")
    _bars(per_conn, figures, PER_CONNECTION, "rate", "messages per second")
    per_conn.set_title("a connection per message")
    _bars(cpu, figures, PIPELINED + PER_CONNECTION, "cpu_us", "client CPU, us/msg")
    cpu.set_yscale("log")
    cpu.set_title("client CPU per message (log scale)")
    fig.suptitle(
        f"txstarttls client, 2 KB messages, verified STARTTLS + AUTH PLAIN,"
        f" median of {rounds} rounds"
    )
    fig.tight_layout()
    fig.savefig(output, dpi=100)


def _bars(
    axes: Any,
    figures: dict[str, dict[str, float]],
    senders: tuple[str, ...],
    key: str,
    label: str,
) -> None:
    shown = [s for s in senders if s in figures]
    axes.bar(
        range(len(shown)),
        [figures[s][key] for s in shown],
        color=[OURS if s.startswith("txstarttls") else OTHERS for s in shown],
    )
    axes.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(label)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="bench_client.py --json output")
    parser.add_argument("output", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.results.read_text())
    except (OSError, ValueError) as error:
        print(f"chart_client: cannot read {args.results}: {error}", file=sys.stderr)
        return 1
    try:
        draw(medians(record), len(record), args.output)
    except ImportError:
        print(
            "chart_client: needs matplotlib (pip install matplotlib)", file=sys.stderr
        )
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
