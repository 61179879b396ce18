"""Relay end to end: smtp-source -> relay -> STARTTLS + AUTH smarthost.

Run by hand, never as a test (needs root, Debian's postfix package, a C
compiler and the OpenSSL headers)::

    python bench/bench_end_to_end.py [--count 10000] [--sessions 20]
        [--size 2048] [--rounds 2] [--only NAME ...] [--profile DIR]

Issue 4, section 8. The smarthost is the C sink of ``bench/sink/sink.c``
on 127.0.0.1: STARTTLS with a certificate for ``mx.test.example`` from a
throwaway CA, AUTH PLAIN (required before MAIL), PIPELINING, and a counter;
it stores nothing, so it is never the bottleneck. Each configuration gets a
fresh sink, and in one run:

- ``txstarttls``: ``twistd -n starttls-relay`` with ``--smarthost``,
  ``--tls required``, ``--tls-hostname``, ``--ca-file``, ``--username`` and
  ``--password-file`` (its defaults otherwise: 20 deliveries in flight over
  at most 8 reused sessions);
- ``postfix-default``: a private Postfix relay, ``relayhost =
  [127.0.0.1]:PORT``, ``smtp_tls_security_level = secure`` (certificate
  verified against the CA, name matched through ``smtp_tls_policy_maps``),
  SASL client AUTH with ``smtp_sasl_password_maps``; Postfix's defaults
  otherwise, so a new TLS session per delivery;
- ``postfix-reuse``: the same with ``smtp_tls_connection_reuse = yes``
  (TLS connections cached through tlsproxy).

``smtp-source -s SESSIONS -m COUNT -l SIZE`` submits (after a warm-up that is
delivered and discarded from the figures); the rate is messages counted at
the sink over the wall time from the start of submission to the last
arrival. Memory: the relay's peak RSS and PSS (with its listener processes,
if any, summed) against the peak PSS
of Postfix's whole process tree (every process carrying the instance's
``MAIL_CONFIG``), sampled from ``/proc/PID/smaps_rollup``. Afterwards both
queues must be empty.

The relay logs to stdout through a pipe to another process, as under
systemd. Rounds alternate the order (ABBA). ``--profile DIR`` (py-spy) and
``--perf DIR`` (perf) profile the relay.

The machine is shared and noisy: compare configurations within one round.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from relaybench import (
    HOST,
    SMTP_PASSWORD,
    SMTP_USER,
    TLS_NAME,
    BenchError,
    MemorySampler,
    Perf,
    Postfix,
    PySpy,
    Relay,
    Sink,
    abba_order,
    add_load_options,
    add_output_options,
    add_relay_options,
    build_sink,
    cpu_split,
    exit_on_signals,
    machine_note,
    make_certificates,
    make_workdir,
    markdown_table,
    peak_rss_kb,
    print_summary,
    remove_workdir,
    require_postfix_tools,
    smtp_source,
    summarize_profile,
)

CONFIGURATIONS = ("txstarttls", "postfix-default", "postfix-reuse")

POSTFIX_RELAY = """\
relayhost = [{host}]:{port}
smtp_tls_security_level = secure
smtp_tls_CAfile = {ca}
smtp_tls_policy_maps = texthash:{etc}/tls_policy
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{etc}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_connection_reuse = {reuse}
"""


@dataclass
class Outcome:
    configuration: str
    round: int
    messages: int
    submit_seconds: float
    delivered_seconds: float
    rate: float
    sink_connections: int
    peak_rss_mb: float
    peak_pss_mb: float
    cpu_ms_per_msg: float
    sink_cpu_us_per_msg: float
    detail: str


class Tracker:
    """Watches the sink while smtp-source runs; records the last arrival."""

    def __init__(self, sink: Sink, target: int) -> None:
        self.sink = sink
        self.target = target
        self.last_change = time.perf_counter()
        self.seen = sink.accepted()

    def poll(self) -> bool:
        count = self.sink.accepted()
        now = time.perf_counter()
        if count != self.seen:
            self.seen = count
            self.last_change = now
        return count >= self.target


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_options(parser)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA order")
    parser.add_argument(
        "--only", action="append", choices=CONFIGURATIONS, help="repeatable"
    )
    add_relay_options(parser)
    parser.add_argument(
        "--timeout", type=float, default=240.0, help="seconds per configuration"
    )
    parser.add_argument("--profile", type=Path, help="py-spy the relay into DIR")
    parser.add_argument("--perf", type=Path, help="perf record the relay into DIR")
    add_output_options(parser)
    return parser.parse_args()


def wait_for(
    tracker: Tracker, deadline: float, describe: str, explain: Callable[[], str]
) -> None:
    while not tracker.poll():
        if time.perf_counter() > deadline:
            raise BenchError(
                f"{describe}: the sink has {tracker.seen} of {tracker.target} "
                f"messages\n{explain()}"
            )
        time.sleep(0.02)


def warm_up(
    args: argparse.Namespace,
    name: str,
    port: int,
    sink: Sink,
    explain: Callable[[], str],
) -> None:
    """Deliver a few messages first: processes started, sessions open."""
    if args.warmup:
        smtp_source(port, args.warmup, sessions=args.sessions, size=args.size)
        tracker = Tracker(sink, args.warmup)
        wait_for(tracker, time.perf_counter() + 60, f"{name} warm-up", explain)


def drive(
    args: argparse.Namespace,
    name: str,
    port: int,
    sink: Sink,
    explain: Callable[[], str],
) -> tuple[float, float, int, dict[str, float], dict[str, float]]:
    """Time submission and delivery: (submit s, delivered s, connections, ...)."""
    before = sink.stats()
    tracker = Tracker(sink, int(before["accepted"]) + args.count)
    started = time.perf_counter()
    load = smtp_source(port, args.count, sessions=args.sessions, size=args.size)
    wait_for(tracker, started + args.timeout, name, explain)
    after = sink.stats()
    delivered = tracker.last_change - started
    connections = int(after["connections"] - before["connections"])
    return load.elapsed, delivered, connections, before, after


def run_relay(
    args: argparse.Namespace, workdir: Path, sink: Sink, ca: Path, round_: int
) -> Outcome:
    password_file = workdir / "smarthost-password"
    password_file.write_text(SMTP_PASSWORD + "\n")
    password_file.chmod(0o600)
    with contextlib.ExitStack() as stack:
        relay = Relay(
            workdir,
            [
                "--smarthost",
                f"{HOST}:{sink.port}",
                "--tls",
                "required",
                "--tls-hostname",
                TLS_NAME,
                "--ca-file",
                str(ca),
                "--username",
                SMTP_USER,
                "--password-file",
                str(password_file),
                *args.relay_arg,
            ],
            log_to=args.relay_log,
            twistd_args=args.twistd_arg,
        )
        stack.callback(relay.stop)

        def explain() -> str:
            return f"--- relay log ---\n{relay.log_tail()}"

        perf = None
        if args.perf is not None:
            args.perf.mkdir(parents=True, exist_ok=True)
            perf = Perf(relay.pid, args.perf / f"end-to-end-relay-{round_}.data")
            stack.callback(perf.stop)
        spy = None
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            spy = PySpy(relay.pid, args.profile / f"end-to-end-relay-{round_}.txt")
            stack.callback(spy.stop)
        with MemorySampler(relay.memory) as sampler:
            warm_up(args, "txstarttls", relay.port, sink, explain)
            cpu_before, threads_before = relay.cpu(), relay.thread_cpu()
            submit, delivered, connections, before, after = drive(
                args, "txstarttls", relay.port, sink, explain
            )
            cpu = relay.cpu() - cpu_before
            threads_after = relay.thread_cpu()
        print(f"relay CPU: {cpu_split(threads_before, threads_after, delivered)}")
        if perf is not None:
            perf.stop()
            print(f"\nrelay perf, round {round_} ({perf.output}):")
            print(perf.summary())
        if spy is not None:
            spy.stop()
            print(f"\nrelay profile, round {round_} ({spy.output}):")
            print(summarize_profile(spy.output))
        hwm = peak_rss_kb(relay.pid)
        listeners = relay.listener_pids()
        queued = wait_empty(lambda: relay.queued()["envelopes"])
        if queued:
            raise BenchError(f"the relay still holds {queued} messages\n{explain()}")
        return outcome(
            "txstarttls relay",
            round_,
            args,
            submit,
            delivered,
            connections,
            max(hwm, sampler.peak_rss_kb),
            sampler.peak_pss_kb,
            cpu,
            before,
            after,
            "relay process" + (" and listener processes" if listeners else ""),
        )


def run_postfix(
    args: argparse.Namespace,
    workdir: Path,
    sink: Sink,
    ca: Path,
    round_: int,
    *,
    reuse: bool,
) -> Outcome:
    name = "postfix-reuse" if reuse else "postfix-default"
    with contextlib.ExitStack() as stack:
        etc = workdir / "etc"
        postfix = Postfix(
            workdir,
            POSTFIX_RELAY.format(
                host=HOST,
                port=sink.port,
                ca=ca,
                etc=etc,
                reuse="yes" if reuse else "no",
            ),
        )
        stack.callback(postfix.stop)
        nexthop = f"[{HOST}]:{sink.port}"
        (etc / "tls_policy").write_text(f"{nexthop} secure match={TLS_NAME}\n")
        (etc / "sasl_passwd").write_text(f"{nexthop} {SMTP_USER}:{SMTP_PASSWORD}\n")
        postfix.start()

        def explain() -> str:
            return (
                f"queue: {postfix.queued()}\n--- maillog ---\n{postfix.maillog_tail()}"
            )

        with MemorySampler(postfix.memory, interval=0.2) as sampler:
            warm_up(args, name, postfix.port, sink, explain)
            cpu_before = postfix.cpu()
            submit, delivered, connections, before, after = drive(
                args, name, postfix.port, sink, explain
            )
            cpu = postfix.cpu() - cpu_before
        queued = wait_empty(lambda: sum(postfix.queued().values()))
        if queued:
            raise BenchError(f"Postfix still holds {queued} messages\n{explain()}")
        sent = postfix.maillog_count(r"status=sent")
        if sent != args.warmup + args.count:
            raise BenchError(f"Postfix logged {sent} deliveries\n{explain()}")
        label = "Postfix, TLS connection reuse" if reuse else "Postfix, defaults"
        return outcome(
            label,
            round_,
            args,
            submit,
            delivered,
            connections,
            sampler.peak_rss_kb,
            sampler.peak_pss_kb,
            cpu,
            before,
            after,
            "whole process tree",
        )


def wait_empty(count: Callable[[], int], timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = count()
        if not left or time.monotonic() > deadline:
            return int(left)
        time.sleep(0.1)


def outcome(
    label: str,
    round_: int,
    args: argparse.Namespace,
    submit: float,
    delivered: float,
    connections: int,
    rss_kb: int,
    pss_kb: int,
    cpu: float,
    before: dict[str, float],
    after: dict[str, float],
    detail: str,
) -> Outcome:
    sink_cpu = (after["cpu_user"] + after["cpu_sys"]) - (
        before["cpu_user"] + before["cpu_sys"]
    )
    return Outcome(
        configuration=label,
        round=round_,
        messages=args.count,
        submit_seconds=submit,
        delivered_seconds=delivered,
        rate=args.count / delivered,
        sink_connections=connections,
        peak_rss_mb=rss_kb / 1024,
        peak_pss_mb=pss_kb / 1024,
        cpu_ms_per_msg=cpu * 1000 / args.count,
        sink_cpu_us_per_msg=sink_cpu * 1e6 / args.count,
        detail=detail,
    )


def report(outcomes: list[Outcome]) -> str:
    rows = []
    for item in outcomes:
        anchors = {
            o.configuration: o.rate
            for o in outcomes
            if o.round == item.round and o.configuration.startswith("Postfix")
        }
        default = anchors.get("Postfix, defaults")
        reuse = anchors.get("Postfix, TLS connection reuse")
        rows.append(
            [
                str(item.round),
                item.configuration,
                f"{item.messages}",
                f"{item.submit_seconds:.1f}",
                f"{item.delivered_seconds:.1f}",
                f"{item.rate:.0f}",
                f"{item.rate / default:.2f}x" if default else "-",
                f"{item.rate / reuse:.2f}x" if reuse else "-",
                f"{item.sink_connections}",
                f"{item.peak_rss_mb:.0f} / {item.peak_pss_mb:.0f} ({item.detail})",
                f"{item.cpu_ms_per_msg:.2f}",
                f"{item.sink_cpu_us_per_msg:.0f}",
            ]
        )
    return markdown_table(
        [
            "round",
            "configuration",
            "messages",
            "submitted s",
            "delivered s",
            "msgs/s end to end",
            "vs Postfix defaults",
            "vs Postfix reuse",
            "sink connections",
            "peak RSS / PSS MB",
            "CPU ms/msg",
            "sink CPU us/msg",
        ],
        rows,
    )


def main() -> int:
    args = parse_args()
    exit_on_signals()
    require_postfix_tools()
    print(machine_note())
    print(
        f"smtp-source -s {args.sessions} -m {args.count} -l {args.size}; "
        f"warm-up {args.warmup}; sink: bench/sink/sink.c (STARTTLS, AUTH PLAIN)"
    )
    workdir = make_workdir("relay-bench-e2e-")
    outcomes: list[Outcome] = []
    chosen = [c for c in CONFIGURATIONS if not args.only or c in args.only]
    try:
        binary = build_sink(workdir)
        ca, cert, key = make_certificates(workdir)
        for round_, name in abba_order(chosen, args.rounds):
            where = workdir / f"{name}-{round_}"
            where.mkdir(mode=0o755)
            sink = Sink(binary, where, cert, key)
            try:
                if name == "txstarttls":
                    item = run_relay(args, where, sink, ca, round_)
                else:
                    item = run_postfix(
                        args, where, sink, ca, round_, reuse=name.endswith("reuse")
                    )
            finally:
                sink.stop()
            print(
                f"round {round_} {item.configuration}: {item.rate:.0f} msgs/s "
                f"end to end, {item.sink_connections} sink connections, peak "
                f"PSS {item.peak_pss_mb:.0f} MB",
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
        rates.setdefault(item.configuration, []).append(
            (item.messages, item.delivered_seconds)
        )
    print_summary(
        report(outcomes),
        rates,
        "Postfix, TLS connection reuse",
        [asdict(o) for o in outcomes],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
