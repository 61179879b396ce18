"""Relay acceptance: the relay's listener and durable queue against Postfix's.

Run by hand, never as a test (needs root and Debian's postfix package)::

    python bench/bench_acceptance.py [--count 10000] [--sessions 20]
        [--size 2048] [--mode hold|refused] [--rounds 2] [--profile DIR]

Issue 3, section 5. In one run, Postfix's C load generator ``smtp-source``
(``-s SESSIONS -m COUNT -l SIZE``, a new connection per message as it does
by default; ``--reuse`` adds ``-d``) drives:

- the relay, ``twistd -n starttls-relay`` on 127.0.0.1, with its durable
  queue (content and envelope fsynced, files and directory, before ``250``);
- a private Postfix (own configuration and queue directories, 127.0.0.1),
  with its normal durable queue (cleanup fsyncs the queue file before
  ``250``).

Delivery is kept out of the way so only acceptance is measured:

- ``--mode hold`` (default): the relay's smarthost is a socket that listens
  but never accepts, so the few delivery attempts wait for a greeting
  (300 s) and nothing else happens; Postfix puts every message on hold
  (``check_client_access static:HOLD``), so qmgr never touches it;
- ``--mode refused``: the relay's smarthost refuses connections, so each
  message is tried once and its envelope rewritten as deferred; Postfix has
  ``defer_transports = smtp``, so qmgr moves each message to the deferred
  queue with a defer log.

``--anchor`` adds a third server to every round, ``bench/twisted_floor.py``:
canned replies from a bare Twisted protocol that keeps nothing, the least a
Twisted listener can cost for the same connections. smtp-source's own CPU
per message is reported too: on two CPUs it shares the machine with the
server under test.

While smtp-source runs, a separate Python client (``relaybench.py probe``)
sends paced messages over its own connections and times each final dot to
its reply: the 50th and 99th percentiles are reported. The servers' memory
(relay process and any listener processes; Postfix's whole process tree) is
sampled from
``/proc/PID/smaps_rollup``, their CPU from ``/proc/PID/stat``. Afterwards
the queues must hold exactly what was sent (warm-up + load + probe).

The relay logs to stdout through a pipe to another process, as under
systemd (``--relay-log file`` writes straight into a file instead). Rounds
alternate the order (ABBA), and the queues are removed only at the end. For
the relay's hot spots: ``--profile DIR`` (py-spy; ``--profile-gil`` for
Python CPU only) and ``--perf DIR`` (perf, kernel stacks included).

The machine is shared and noisy: compare the two servers within one round,
not bare rates across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from relaybench import (
    HOST,
    BenchError,
    Floor,
    MemorySampler,
    Perf,
    Postfix,
    Probe,
    ProbeResult,
    PySpy,
    Relay,
    abba_order,
    add_load_options,
    add_output_options,
    add_relay_options,
    cpu_seconds,
    cpu_split,
    exit_on_signals,
    free_port,
    machine_note,
    make_workdir,
    markdown_table,
    peak_rss_kb,
    print_summary,
    remove_workdir,
    require_postfix_tools,
    smtp_source,
    summarize_profile,
)

POSTFIX_MODES = {
    "hold": (
        "smtpd_relay_restrictions = check_client_access static:HOLD,"
        " permit_mynetworks, reject\n"
        "relayhost = [127.0.0.1]:1\n"
    ),
    "refused": "relayhost = [127.0.0.1]:1\ndefer_transports = smtp\n",
}


@dataclass
class Outcome:
    server: str
    round: int
    messages: int
    elapsed: float
    rate: float
    probe_count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    peak_rss_mb: float
    peak_pss_mb: float
    cpu_ms_per_msg: float
    load_cpu_ms_per_msg: float
    queued: int
    expected: int
    queue_detail: str


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_options(parser)
    parser.add_argument("--reuse", action="store_true", help="smtp-source -d")
    parser.add_argument("--mode", choices=sorted(POSTFIX_MODES), default="hold")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA order")
    parser.add_argument(
        "--only", choices=["relay", "postfix", "floor"], help="run one server only"
    )
    parser.add_argument(
        "--anchor",
        action="store_true",
        help="add the bare Twisted responder (bench/twisted_floor.py) to each round",
    )
    parser.add_argument("--probe-rate", type=float, default=50.0, help="msgs/s")
    parser.add_argument("--probe-connections", type=int, default=2)
    parser.add_argument("--probe-limit", type=int, default=2000)
    add_relay_options(parser)
    parser.add_argument("--profile", type=Path, help="py-spy the relay into DIR")
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="profile only the thread holding the GIL (Python CPU), not wall time",
    )
    parser.add_argument("--perf", type=Path, help="perf record the relay into DIR")
    add_output_options(parser)
    return parser.parse_args()


@dataclass
class Measured:
    """One server's loaded run: the load, the probe, then what it cost."""

    elapsed: float
    load_cpu: float
    probe: ProbeResult
    rss_kb: int = 0
    pss_kb: int = 0
    cpu: float = 0.0


def loaded_run(
    args: argparse.Namespace,
    workdir: Path,
    port: int,
    sampler: MemorySampler,
) -> Measured:
    probe: Probe | None = None

    def start_probe() -> None:
        nonlocal probe
        probe = Probe(
            workdir,
            port,
            rate=args.probe_rate,
            connections=args.probe_connections,
            limit=args.probe_limit,
            size=args.size,
        )

    try:
        with sampler:
            load = smtp_source(
                port,
                args.count,
                sessions=args.sessions,
                size=args.size,
                reuse=args.reuse,
                on_start=start_probe,
            )
        assert probe is not None
        result = probe.finish()
    finally:
        if probe is not None:
            probe.abandon()
    if result.errors:
        raise BenchError(f"latency probe errors: {result.errors[:3]}")
    return Measured(load.elapsed, load.cpu, result)


def run_relay(args: argparse.Namespace, workdir: Path, round_: int) -> Outcome:
    with contextlib.ExitStack() as stack:
        blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if args.mode == "hold":
            # Listens, never accepts: connections wait for a greeting.
            blackhole.bind((HOST, 0))
            blackhole.listen(64)
            smarthost = f"{HOST}:{blackhole.getsockname()[1]}"
        else:
            smarthost = f"{HOST}:{free_port()}"  # nothing listens: refused
        relay = Relay(
            workdir,
            ["--smarthost", smarthost, "--tls", "none", *args.relay_arg],
            log_to=args.relay_log,
            twistd_args=args.twistd_arg,
        )
        stack.callback(relay.stop)
        # Closed first: the waiting deliveries are reset, so the relay stops fast.
        stack.callback(blackhole.close)
        if args.warmup:
            smtp_source(relay.port, args.warmup, sessions=args.sessions, size=args.size)
        perf = None
        if args.perf is not None:
            args.perf.mkdir(parents=True, exist_ok=True)
            perf = Perf(relay.pid, args.perf / f"acceptance-relay-{round_}.data")
            stack.callback(perf.stop)
        spy = None
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            spy = PySpy(
                relay.pid,
                args.profile / f"acceptance-relay-{round_}.txt",
                gil=args.profile_gil,
            )
            stack.callback(spy.stop)
        cpu_before, threads_before = relay.cpu(), relay.thread_cpu()
        own_before = cpu_seconds(relay.pid)
        sampler = MemorySampler(relay.memory)
        run = loaded_run(args, workdir, relay.port, sampler)
        run.cpu = cpu = relay.cpu() - cpu_before
        elapsed = run.elapsed
        print(f"relay CPU: {cpu_split(threads_before, relay.thread_cpu(), elapsed)}")
        listeners = cpu - (cpu_seconds(relay.pid) - own_before)
        if relay.listener_pids():
            print(f"listener processes: {100 * listeners / elapsed:.0f}% of a core")
        if perf is not None:
            perf.stop()
            print(f"\nrelay perf, round {round_} ({perf.output}):")
            print(perf.summary())
        if spy is not None:
            spy.stop()
            print(f"\nrelay profile, round {round_} ({spy.output}):")
            print(summarize_profile(spy.output))
        run.rss_kb = max(peak_rss_kb(relay.pid), sampler.peak_rss_kb)
        run.pss_kb = sampler.peak_pss_kb
        if not relay.alive():
            raise BenchError(f"the relay died:\n{relay.log_tail()}")
        expected = args.warmup + args.count + run.probe.accepted
        deadline = time.monotonic() + 30
        while True:
            # Temporary files are writes in flight (deferrals, refused mode).
            counts = relay.queued()
            done = counts["temporary"] == 0 and counts["envelopes"] >= expected
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        queued = counts["envelopes"]
        detail = (
            f"{queued} envelopes, {counts['contents']} contents, "
            f"{counts['temporary']} temporary"
        )
        ok = queued == counts["contents"] == expected and counts["temporary"] == 0
        server = "txstarttls relay"
        return outcome(server, round_, args, run, queued, expected, detail, ok)


def run_postfix(args: argparse.Namespace, workdir: Path, round_: int) -> Outcome:
    with contextlib.ExitStack() as stack:
        postfix = Postfix(workdir, POSTFIX_MODES[args.mode])
        stack.callback(postfix.stop)
        postfix.start()
        if args.warmup:
            smtp_source(
                postfix.port, args.warmup, sessions=args.sessions, size=args.size
            )
        cpu_before = postfix.cpu()
        sampler = MemorySampler(postfix.memory, interval=0.2)
        run = loaded_run(args, workdir, postfix.port, sampler)
        run.cpu = postfix.cpu() - cpu_before
        run.rss_kb, run.pss_kb = sampler.peak_rss_kb, sampler.peak_pss_kb
        expected = args.warmup + args.count + run.probe.accepted
        wanted = "hold" if args.mode == "hold" else "deferred"
        deadline = time.monotonic() + 30
        while True:
            counts = postfix.queued()
            if counts[wanted] >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # qmgr still moving messages (refused mode)
        queued = counts[wanted]
        detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        ok = sum(counts.values()) == queued == expected
        server = f"Postfix ({args.mode})"
        return outcome(server, round_, args, run, queued, expected, detail, ok)


def run_floor(args: argparse.Namespace, workdir: Path, round_: int) -> Outcome:
    floor = Floor()
    try:
        if args.warmup:
            smtp_source(floor.port, args.warmup, sessions=args.sessions, size=args.size)
        cpu_before = cpu_seconds(floor.pid)
        sampler = MemorySampler(floor.memory)
        run = loaded_run(args, workdir, floor.port, sampler)
        run.cpu = cpu_seconds(floor.pid) - cpu_before
        run.rss_kb = max(peak_rss_kb(floor.pid), sampler.peak_rss_kb)
        run.pss_kb = sampler.peak_pss_kb
    finally:
        acknowledged = floor.stop()
    expected = args.warmup + args.count + run.probe.accepted
    detail = f"{acknowledged} acknowledged"
    ok = acknowledged == expected
    server = "Twisted floor (keeps nothing)"
    return outcome(server, round_, args, run, acknowledged, expected, detail, ok)


def outcome(
    server: str,
    round_: int,
    args: argparse.Namespace,
    run: Measured,
    queued: int,
    expected: int,
    detail: str,
    ok: bool,
) -> Outcome:
    if not ok:
        raise BenchError(
            f"{server}: the queue holds {detail}; expected exactly {expected}"
        )
    probe = run.probe
    return Outcome(
        server=server,
        round=round_,
        messages=args.count,
        elapsed=run.elapsed,
        rate=args.count / run.elapsed,
        probe_count=len(probe.latencies),
        p50_ms=probe.median * 1000,
        p99_ms=probe.p(99) * 1000,
        max_ms=max(probe.latencies, default=float("nan")) * 1000,
        peak_rss_mb=run.rss_kb / 1024,
        peak_pss_mb=run.pss_kb / 1024,
        cpu_ms_per_msg=run.cpu * 1000 / (args.count + len(probe.latencies)),
        load_cpu_ms_per_msg=run.load_cpu * 1000 / args.count,
        queued=queued,
        expected=expected,
        queue_detail=detail,
    )


def report(outcomes: list[Outcome]) -> str:
    rows = []
    for item in outcomes:
        anchor = next(
            (
                o
                for o in outcomes
                if o.round == item.round and o.server.startswith("Postfix")
            ),
            None,
        )
        ratio = f"{item.rate / anchor.rate:.2f}x" if anchor else "-"
        rows.append(
            [
                str(item.round),
                item.server,
                f"{item.messages}",
                f"{item.elapsed:.1f}",
                f"{item.rate:.0f}",
                ratio,
                f"{item.p50_ms:.1f} / {item.p99_ms:.1f} (n={item.probe_count})",
                f"{item.peak_rss_mb:.0f} / {item.peak_pss_mb:.0f}",
                f"{item.cpu_ms_per_msg:.2f}",
                f"{item.load_cpu_ms_per_msg:.2f}",
                f"{item.queued} = {item.expected}",
            ]
        )
    return markdown_table(
        [
            "round",
            "server",
            "messages",
            "seconds",
            "msgs/s",
            "vs Postfix",
            "dot->250 p50 / p99 ms",
            "peak RSS / PSS MB",
            "CPU ms/msg",
            "smtp-source CPU ms/msg",
            "queued = sent",
        ],
        rows,
    )


def main() -> int:
    args = parse_args()
    exit_on_signals()
    require_postfix_tools()
    print(machine_note())
    print(
        f"smtp-source -s {args.sessions} -m {args.count} -l {args.size}"
        f"{' -d' if args.reuse else ''}; warm-up {args.warmup}; mode {args.mode}; "
        f"probe {args.probe_rate:g} msgs/s over {args.probe_connections} connections"
    )
    workdir = make_workdir("relay-bench-acceptance-")
    outcomes: list[Outcome] = []
    try:
        servers = ["relay", "postfix"] if args.only is None else [args.only]
        if args.anchor and "floor" not in servers:
            servers.append("floor")
        for round_, server in abba_order(servers, args.rounds):
            where = workdir / f"{server}-{round_}"
            where.mkdir(mode=0o755)
            run = {"relay": run_relay, "postfix": run_postfix, "floor": run_floor}[
                server
            ]
            item = run(args, where, round_)
            print(
                f"round {round_} {item.server}: {item.rate:.0f} msgs/s, p99 "
                f"{item.p99_ms:.1f} ms, peak PSS {item.peak_pss_mb:.0f} MB",
                flush=True,
            )
            outcomes.append(item)
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        remove_workdir(workdir, args.keep)
    rates: dict[str, list[tuple[int, float]]] = {}
    for item in outcomes:
        rates.setdefault(item.server, []).append((item.messages, item.elapsed))
    print_summary(
        report(outcomes),
        rates,
        f"Postfix ({args.mode})",
        [asdict(o) for o in outcomes],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
