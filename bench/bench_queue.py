"""Group commit in the durable queue: add() throughput against fsync anchors.

Run by hand, never as a test::

    python bench/bench_queue.py [--dir PARENT] [--seconds 2.0] [--rounds 2]

PARENT defaults to /var/tmp: /tmp is often a tmpfs, where fsync costs
nothing and the figures would mean nothing.

Each round measures, in one temporary directory on one filesystem:

- ``fsync``: the raw cost of one fsync per 2 KB message (write, fsync, close);
- ``serial``: what a naive spool does per message (write a 2 KB file, fsync,
  rename it into place, fsync the directory);
- ``create``: creating a 2 KB file, no fsync: the metadata floor (one
  creation per queued message: ``tmp/ID.N.msg.tmp``, renamed to
  ``messages/ID.msg``);
- ``add() cN``: FilesystemStore.add() of 2 KB messages, durable, with N adds
  in flight at any time.

The machine is shared and noisy, so the figures that matter are the ratios
to the anchors measured in the same round, not the bare rates.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorFromThreads

from txstarttls.queue import FilesystemStore, QueueEntry, RecipientState, new_queue_id

CONTENT = (b"Subject: benchmark\r\n\r\n" + b"x" * 76 + b"\r\n") * 26
CONTENT = CONTENT[:2048]
CONCURRENCY = (1, 10, 50)


def anchor_fsync(directory: Path, seconds: float) -> float:
    """Messages per second when each costs one fsync of a 2 KB file."""
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fd = os.open(directory / f"f{count}", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, CONTENT)
        os.fsync(fd)
        os.close(fd)
        count += 1
    return count / (time.perf_counter() - start)


def anchor_create(directory: Path, seconds: float) -> float:
    """File creations per second (2 KB, no fsync): the metadata floor."""
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fd = os.open(directory / f"c{count}", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, CONTENT)
        os.close(fd)
        count += 1
    return count / (time.perf_counter() - start)


def anchor_serial(directory: Path, seconds: float) -> float:
    """Messages per second for write + fsync + rename + directory fsync each."""
    tmp = directory / "tmp"
    final = directory / "final"
    tmp.mkdir()
    final.mkdir()
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        source = tmp / f"m{count}"
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, CONTENT)
        os.fsync(fd)
        os.close(fd)
        os.replace(source, final / f"m{count}")
        dfd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        count += 1
    return count / (time.perf_counter() - start)


def filesystem_of(path: str) -> str:
    """The type of the filesystem holding ``path``, from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            _, mountpoint, fstype, *_ = line.split()
            inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) > len(best):
                best, kind = mountpoint, fstype
    return kind


def entry() -> QueueEntry:
    return QueueEntry(
        queue_id=new_queue_id(),
        sender="bench@example.org",
        recipients=(RecipientState("someone@example.com"),),
        arrival_time=time.time(),
        size=len(CONTENT),
    )


async def measure_adds(
    reactor: IReactorFromThreads, directory: Path, concurrency: int, seconds: float
) -> float:
    """Messages per second through add() with ``concurrency`` adds in flight."""
    store = FilesystemStore(directory, reactor)
    store.recover()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    finished: defer.Deferred[None] = defer.Deferred()
    in_flight = 0

    def start_one() -> None:
        nonlocal in_flight
        in_flight += 1
        store.add(entry(), CONTENT).addCallback(completed)

    def completed(_: None) -> None:
        nonlocal done, in_flight
        done += 1
        in_flight -= 1
        if time.perf_counter() < deadline:
            start_one()
        elif in_flight == 0:
            finished.callback(None)

    for _ in range(concurrency):
        start_one()
    await finished
    elapsed = time.perf_counter() - start
    await store.close()
    return done / elapsed


async def run(reactor: IReactorFromThreads, options: argparse.Namespace) -> None:
    parent = tempfile.mkdtemp(prefix="bench-queue-", dir=options.dir)
    results: dict[str, list[float]] = {}
    ratios: dict[str, list[tuple[float, float]]] = {}
    try:
        print(
            f"directory: {parent} ({filesystem_of(os.path.realpath(parent))}), "
            f"{options.rounds} rounds of {options.seconds} s per figure"
        )
        for round_number in range(options.rounds):
            base = Path(parent) / f"round{round_number}"
            base.mkdir()
            anchors: dict[str, Callable[[Path, float], float]] = {
                "fsync": anchor_fsync,
                "serial": anchor_serial,
                "create": anchor_create,
            }
            for name, anchor in anchors.items():
                (base / name).mkdir()
                results.setdefault(name, []).append(
                    anchor(base / name, options.seconds)
                )
            for concurrency in CONCURRENCY:
                name = f"add() c{concurrency}"
                rate = await measure_adds(
                    reactor, base / f"c{concurrency}", concurrency, options.seconds
                )
                results.setdefault(name, []).append(rate)
                ratios.setdefault(name, []).append(
                    (rate / results["fsync"][-1], rate / results["serial"][-1])
                )
    finally:
        # Only now: on ext4 without a journal, fresh deletions make every
        # later file creation in the block group scan past them.
        shutil.rmtree(parent, ignore_errors=True)
    print(f"{'':14}{'msgs/s':>10}{'x fsync':>10}{'x serial':>10}")
    for name, rates in results.items():
        line = f"{name:14}{statistics.median(rates):10.0f}"
        if name in ratios:
            to_fsync = statistics.median(r[0] for r in ratios[name])
            to_serial = statistics.median(r[1] for r in ratios[name])
            line += f"{to_fsync:10.2f}{to_serial:10.2f}"
        print(line)
    print("(medians over rounds; ratios are taken within each round)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir",
        default="/var/tmp" if os.path.isdir("/var/tmp") else None,
        help="parent of the temporary directory (default: /var/tmp)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    options.rounds = max(1, min(options.rounds, 4))
    figures = 3 + len(CONCURRENCY)
    # Keep the whole run under a minute, whatever was asked.
    options.seconds = min(options.seconds, 48 / (figures * options.rounds))

    def go(reactor: object) -> defer.Deferred[None]:
        return defer.ensureDeferred(run(cast(IReactorFromThreads, reactor), options))

    task.react(go)


if __name__ == "__main__":
    main()
