"""Shared machinery for the relay benchmarks (acceptance and end to end).

Run by hand through ``bench_acceptance.py`` and ``bench_end_to_end.py``,
never as a test. Everything here is self-contained (nothing from ``tests/``):

- a private Postfix instance: its own configuration, queue and data
  directories under a fresh temporary directory, listening on 127.0.0.1
  only, run as our own child (``master -d``) and stopped with
  ``postfix -c DIR stop``, then by signal, then by killing whatever still
  carries its ``MAIL_CONFIG``;
- the relay, ``twistd -n starttls-relay``, as a child process;
- the C sink of ``bench/sink/sink.c`` (STARTTLS, AUTH PLAIN, a counter),
  built with ``cc`` into the run's directory;
- ``smtp-source``, Postfix's C load generator;
- a memory sampler (RSS and PSS from ``/proc/PID/smaps_rollup``) and CPU
  accounting for one process or a whole Postfix process tree;
- a latency probe: a small Python client, run as a separate process with
  ``python relaybench.py probe ...``, that sends messages at a steady pace
  while the load runs and times each final dot to its ``250``.

Only loopback addresses are ever used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SINK_SOURCE = HERE / "sink" / "sink.c"

HOST = "127.0.0.1"
TLS_NAME = "mx.test.example"
SENDER = "bench@client.example"
RECIPIENT = "sink@dest.example"
CLIENT_NAME = "client.example"
SMTP_USER = "bench"
SMTP_PASSWORD = "bench-relay-password-1"  # throwaway, loopback only
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_STOP_TIMEOUT = 20.0


class BenchError(Exception):
    """The benchmark could not run or its result is not trustworthy."""


# -- small helpers ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def make_workdir(prefix: str) -> Path:
    """A fresh directory under /tmp that the postfix user may traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


def wait_for_greeting(
    port: int, alive: Callable[[], bool], timeout: float = 30.0
) -> None:
    """Block until 127.0.0.1:port answers ``220``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"the server for port {port} died while starting")
        with (
            contextlib.suppress(OSError),
            socket.create_connection((HOST, port), timeout=2) as conn,
        ):
            conn.settimeout(5)
            if conn.makefile("rb").readline().startswith(b"220 "):
                conn.sendall(b"QUIT\r\n")
                return
        time.sleep(0.05)
    raise BenchError(f"nothing greeted on {HOST}:{port} within {timeout:g}s")


def terminate(process: subprocess.Popen[Any] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP unwind the stack like Ctrl-C, so cleanups run."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, leave)


def cpu_split(
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
    elapsed: float,
) -> str:
    """ "main 61% (user 48 + sys 13), other threads 30% (...)" of one core."""
    parts = []
    for name, label in (("main", "reactor thread"), ("threads", "other threads")):
        user = after[name][0] - before[name][0]
        system = after[name][1] - before[name][1]
        parts.append(
            f"{label} {100 * (user + system) / elapsed:.0f}% of a core "
            f"(user {100 * user / elapsed:.0f}%, sys {100 * system / elapsed:.0f}%)"
        )
    return "; ".join(parts)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """smtp-source's load: the same flags in every relay benchmark."""
    parser.add_argument("--count", type=int, default=10_000, help="messages")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--size", type=int, default=2048, help="payload octets")
    parser.add_argument("--warmup", type=int, default=200, help="messages first")


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    """How the relay under test is started."""
    parser.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        help="extra option for starttls-relay (repeatable)",
    )
    parser.add_argument(
        "--twistd-arg",
        action="append",
        default=[],
        help="extra twistd option, before the subcommand (repeatable)",
    )
    parser.add_argument(
        "--relay-log",
        choices=["pipe", "file"],
        default="pipe",
        help="relay's stdout log: through a pipe to another process (as under "
        "systemd), or straight into a file",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")


def require_postfix_tools() -> None:
    for tool in ("smtp-source", "postfix", "postconf"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin") is None:
            raise SystemExit(f"{tool} is not installed (Debian package postfix)")


def abba_order(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) with the order reversed every other round (ABBA)."""
    for round_ in range(1, rounds + 1):
        for name in names if round_ % 2 else list(reversed(names)):
            yield round_, name


def remove_workdir(workdir: Path, keep: bool) -> None:
    # Queues are removed only at the end: on ext4 without a journal (as
    # here) new inodes skip those freed in the last 30 s, so a removal
    # between configurations would slow the next one's file creation.
    if keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def print_summary(
    table: str,
    rates: dict[str, list[tuple[int, float]]],
    anchor: str,
    records: list[dict[str, Any]],
    json_path: Path | None,
) -> None:
    """The table, the rates over all rounds against ``anchor``, the JSON."""
    print()
    print(table)
    print()
    for line in overall(rates, anchor):
        print(line)
    if json_path is not None:
        json_path.write_text(json.dumps(records, indent=2))


def overall(rates: dict[str, list[tuple[int, float]]], anchor: str) -> list[str]:
    """Per configuration: total messages / total seconds over all rounds, ratio.

    ``rates`` maps a configuration to (messages, seconds) per round.
    """

    def rate(name: str) -> float:
        runs = rates[name]
        return sum(m for m, _ in runs) / sum(s for _, s in runs)

    lines = []
    for name in rates:
        per_round = [m / s for m, s in rates[name]]
        text = f"{name}: {rate(name):.0f} msgs/s over all rounds"
        if anchor in rates and name != anchor:
            text += f", {rate(name) / rate(anchor):.2f}x {anchor}"
        if len(per_round) > 1:
            text += f" (per round: {', '.join(f'{r:.0f}' for r in per_round)})"
        lines.append(text)
    return lines


def machine_note() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3]
    postfix = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (
        f"{os.cpu_count()} CPUs, load average {' '.join(load)} at start, "
        f"Postfix {postfix}, Python {sys.version.split()[0]}"
    )


# -- /proc: memory and CPU --------------------------------------------------------


def rollup_kb(pid: int) -> tuple[int, int] | None:
    """(Rss, Pss) of one process in kB, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (OSError, ValueError):
        return None
    rss = pss = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def summed_rollup_kb(pids: Iterable[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over the processes still alive, in kB."""
    rss = pss = 0
    for pid in pids:
        values = rollup_kb(pid)
        if values is not None:
            rss += values[0]
            pss += values[1]
    return rss, pss


def peak_rss_kb(pid: int) -> int:
    """VmHWM: the kernel's own record of the highest RSS."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _stat_fields(pid: int) -> list[str] | None:
    return _stat_fields_path(f"/proc/{pid}/stat")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime+stime (and cutime+cstime: reaped children) of one process."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is the state (field 3 of stat): utime is field 14.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, sys) CPU seconds of the main thread and of all other threads."""
    totals = {"main": [0.0, 0.0], "threads": [0.0, 0.0]}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = _stat_fields_path(f"/proc/{pid}/task/{tid}/stat")
            if fields is None:
                continue
            slot = totals["main" if int(tid) == pid else "threads"]
            slot[0] += int(fields[11]) / CLOCK_TICKS
            slot[1] += int(fields[12]) / CLOCK_TICKS
    return {name: (user, system) for name, (user, system) in totals.items()}


def child_pids(parent: int, marker: bytes) -> list[int]:
    """Live children of ``parent`` whose command line holds ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[0] == "Z" or int(fields[1]) != parent:
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _stat_fields_path(path: str) -> list[str] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


class MemorySampler:
    """Samples (RSS, PSS) totals in a thread and keeps the peaks."""

    def __init__(
        self, measure: Callable[[], tuple[int, int]], interval: float = 0.1
    ) -> None:
        self._measure = measure
        self._interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        rss, pss = self._measure()
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()


# -- the relay --------------------------------------------------------------------


class Relay:
    """``twistd -n starttls-relay`` as a child process on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        extra: Sequence[str],
        log_to: str = "pipe",
        twistd_args: Sequence[str] = (),
    ) -> None:
        """``log_to``: "pipe" (through a separate process) or "file" (direct)."""
        self.workdir = workdir
        self.queue = workdir / "queue"
        self.log_path = workdir / "relay.log"
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            *twistd_args,
            "starttls-relay",
            "--queue",
            str(self.queue),
            "--listen",
            f"tcp:{self.port}:interface={HOST}",
            "--hostname",
            "relay.bench.example",
            *extra,
        ]
        self.logger: subprocess.Popen[bytes] | None = None
        with self.log_path.open("wb") as log:
            if log_to == "pipe":
                # Like journald under systemd: the relay writes into a pipe
                # and another process puts it on disk.
                self.logger = subprocess.Popen(
                    ["cat"], stdin=subprocess.PIPE, stdout=log, start_new_session=True
                )
                assert self.logger.stdin is not None
                output: Any = self.logger.stdin
            else:
                output = log
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                start_new_session=True,
            )
            if self.logger is not None and self.logger.stdin is not None:
                self.logger.stdin.close()
        self.pid = self.process.pid
        try:
            wait_for_greeting(self.port, self.alive)
        except BenchError as error:
            self.stop()
            raise BenchError(f"{error}\n--- relay log ---\n{self.log_tail()}") from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def listener_pids(self) -> list[int]:
        """The relay's live listener processes (``--listener-processes``)."""
        return child_pids(self.pid, b"txstarttls.listener_process")

    def memory(self) -> tuple[int, int]:
        """(RSS, PSS) of the relay process and its listener processes, in kB."""
        return summed_rollup_kb([self.pid, *self.listener_pids()])

    def cpu(self) -> float:
        """CPU seconds of the relay, its reaped and its live listener processes."""
        total = cpu_seconds(self.pid, children=True)
        return total + sum(cpu_seconds(pid) for pid in self.listener_pids())

    def thread_cpu(self) -> dict[str, tuple[float, float]]:
        return thread_cpu(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def queued(self) -> dict[str, int]:
        """Committed messages, their contents, temporary files.

        A message is one ``ID.msg`` (envelope and content; an ``ID.json`` only
        overrides the envelope after an update) or, in the old layout, an
        ``ID.eml`` with its ``ID.json``.
        """
        messages = self.queue / "messages"
        names = os.listdir(messages) if messages.is_dir() else []
        tmp = self.queue / "tmp"
        one_file = sum(name.endswith(".msg") for name in names)
        two_files = sum(name.endswith(".eml") for name in names)
        return {
            "envelopes": one_file + two_files,
            "contents": one_file + two_files,
            "temporary": len(os.listdir(tmp)) if tmp.is_dir() else 0,
        }

    def stop(self) -> None:
        process, self.process = self.process, None
        terminate(process, _STOP_TIMEOUT)
        logger, self.logger = self.logger, None
        if logger is not None:
            try:
                logger.wait(5)  # ends at end of file, once the relay is gone
            except subprocess.TimeoutExpired:
                terminate(logger, 5)


# -- a private Postfix --------------------------------------------------------------

POSTFIX_BASE_MAIN_CF = """\
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = postfix.bench.example
mydomain = bench.example
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject
"""

# Every service unchrooted ("n" in column 5), as a private instance needs.
POSTFIX_BASE_MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
smtp unix - - n - - smtp
relay unix - - n - - smtp
tlsproxy unix - - n - 0 tlsproxy
"""

_QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold")


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise BenchError(f"{name} is not installed (Debian package postfix)")
    return found


class Postfix:
    """A private Postfix instance; ``main_cf_extra`` is appended to the base."""

    def __init__(self, workdir: Path, main_cf_extra: str = "") -> None:
        if os.geteuid() != 0:
            raise BenchError("a private Postfix instance needs root")
        self.root = workdir
        self.etc = workdir / "etc"
        self.queue = workdir / "queue"
        self.port = free_port()
        self.marker = f"MAIL_CONFIG={self.etc}".encode()
        self._master: subprocess.Popen[bytes] | None = None
        self._ours: dict[tuple[int, str], bool] = {}
        self.etc.mkdir(mode=0o755)
        self.queue.mkdir(mode=0o755)
        (self.etc / "main.cf").write_text(
            POSTFIX_BASE_MAIN_CF.format(
                etc=self.etc, queue=self.queue, data=workdir / "data", root=workdir
            )
            + main_cf_extra
        )
        (self.etc / "master.cf").write_text(
            POSTFIX_BASE_MASTER_CF.format(host=HOST, port=self.port)
        )
        self._run(_binary("postfix"), "-c", str(self.etc), "check")

    def start(self) -> None:
        """Run master in the foreground as our child (reaped by us)."""
        daemon_directory = self._run(
            _binary("postconf"), "-c", str(self.etc), "-h", "daemon_directory"
        ).strip()
        self._master = subprocess.Popen(
            [f"{daemon_directory}/master", "-c", str(self.etc), "-d"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"MAIL_CONFIG": str(self.etc), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            start_new_session=True,
        )
        try:
            wait_for_greeting(self.port, self.alive)
        except BenchError as error:
            raise BenchError(
                f"{error}\n--- maillog ---\n{self.maillog_tail()}"
            ) from None

    def alive(self) -> bool:
        return self._master is not None and self._master.poll() is None

    @property
    def master_pid(self) -> int:
        if self._master is None:
            raise BenchError("Postfix is not running")
        return self._master.pid

    def maillog_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = (self.root / "maillog").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def maillog_count(self, pattern: str) -> int:
        with contextlib.suppress(OSError):
            text = (self.root / "maillog").read_text(errors="replace")
            return len(re.findall(pattern, text))
        return 0

    def queued(self) -> dict[str, int]:
        """Queue files per queue, counted on disk."""
        counts = {}
        for name in _QUEUE_NAMES:
            total = 0
            for _dirpath, _dirs, files in os.walk(self.queue / name):
                total += len(files)
            counts[name] = total
        return counts

    def pids(self) -> list[int]:
        """Every live process of this instance (it carries our MAIL_CONFIG)."""
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            fields = _stat_fields(pid)
            if fields is None or fields[0] == "Z":
                continue
            key = (pid, fields[19])  # starttime tells reused pids apart
            ours = self._ours.get(key)
            if ours is None:
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                ours = self.marker in environ.split(b"\0")
                self._ours[key] = ours
            if ours:
                found.append(pid)
        return found

    def memory(self) -> tuple[int, int]:
        """(RSS, PSS) summed over the whole process tree, in kB."""
        return summed_rollup_kb(self.pids())

    def cpu(self) -> float:
        """CPU seconds of the tree: master with its reaped children, plus the live.

        A daemon that exits is reaped by master and its time moves into
        master's cutime/cstime, so differences of this total are exact.
        """
        master = self.master_pid
        total = cpu_seconds(master, children=True)
        for pid in self.pids():
            if pid != master:
                total += cpu_seconds(pid)
        return total

    def stop(self) -> None:
        """``postfix stop``, then signals; then kill whatever is left of it."""
        master, self._master = self._master, None
        if master is not None and master.poll() is None:
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                subprocess.run(
                    [_binary("postfix"), "-c", str(self.etc), "stop"],
                    capture_output=True,
                    timeout=_STOP_TIMEOUT,
                    check=False,
                )
            try:
                master.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                terminate(master, _STOP_TIMEOUT)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _run(self, *argv: str, input: str | None = None) -> str:
        done = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}"
                f"{done.stderr}\n--- maillog ---\n{self.maillog_tail()}"
            )
        return done.stdout


# -- the C sink -----------------------------------------------------------------


def build_sink(workdir: Path) -> Path:
    if not SINK_SOURCE.is_file():
        raise BenchError(f"{SINK_SOURCE} is missing")
    binary = workdir / "sink"
    command = [
        os.environ.get("CC", "cc"),
        "-O2",
        "-Wall",
        "-o",
        str(binary),
        str(SINK_SOURCE),
        "-lssl",
        "-lcrypto",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"cannot build the sink: {done.stderr}")
    return binary


class Sink:
    """STARTTLS + AUTH PLAIN sink that counts messages (bench/sink/sink.c)."""

    def __init__(self, binary: Path, workdir: Path, cert: Path, key: Path) -> None:
        self.stats_path = workdir / "sink.stats"
        self.log_path = workdir / "sink.out"
        self._seq = 0
        with self.log_path.open("wb") as log:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    str(binary),
                    "0",
                    str(cert),
                    str(key),
                    SMTP_USER,
                    SMTP_PASSWORD,
                    str(self.stats_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if line.startswith("port "):
                    return int(line.split()[1])
            if self.process is None or self.process.poll() is not None:
                raise BenchError(f"sink exited: {self.log_path.read_text()}")
            time.sleep(0.01)
        raise BenchError("sink did not report its port")

    def stats(self) -> dict[str, float]:
        if self.process is None or self.process.poll() is not None:
            raise BenchError(f"sink died: {self.log_path.read_text()[-500:]}")
        self._seq += 1
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                fields = dict(
                    item.split("=", 1) for item in self.stats_path.read_text().split()
                )
                if int(fields["seq"]) >= self._seq:
                    return {key: float(value) for key, value in fields.items()}
            time.sleep(0.002)
        raise BenchError("sink did not report its counters")

    def accepted(self) -> int:
        return int(self.stats()["accepted"])

    def stop(self) -> None:
        process, self.process = self.process, None
        terminate(process, 5)


def make_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for TLS_NAME: (ca, cert, key)."""
    sys.path.insert(0, str(ROOT))
    from txstarttls.testing import CertificateAuthority

    authority = CertificateAuthority("relay bench CA")
    ca = authority.write(workdir, "ca")
    cert, key = authority.issue(TLS_NAME).write(workdir, "server")
    for path in (ca, cert, key):
        path.chmod(0o644)  # the postfix user reads the CA file
    return ca, cert, key


# -- the anchor: a bare Twisted SMTP responder ------------------------------------


class Floor:
    """``bench/twisted_floor.py`` as a child process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, str(HERE / "twisted_floor.py"), str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pid = self.process.pid
        try:
            wait_for_greeting(self.port, self.alive)
        except BenchError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def memory(self) -> tuple[int, int]:
        return rollup_kb(self.pid) or (0, 0)

    def stop(self) -> int:
        """Stop it; how many messages it acknowledged (-1 if it did not say)."""
        if self.process is None:
            return -1
        process, self.process = self.process, None
        terminate(process, _STOP_TIMEOUT)
        output = process.stdout.read() if process.stdout is not None else ""
        found = re.search(r"acknowledged (\d+)", output)
        return int(found.group(1)) if found else -1


# -- load: smtp-source ------------------------------------------------------------


@dataclass
class LoadResult:
    count: int
    elapsed: float
    completed: int
    cpu: float
    """smtp-source's own CPU seconds (user + system)."""

    @property
    def rate(self) -> float:
        return self.count / self.elapsed


def smtp_source(
    port: int,
    count: int,
    *,
    sessions: int,
    size: int,
    reuse: bool = False,
    timeout: float = 600.0,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """Run smtp-source to completion; elapsed from spawn to exit."""
    command = [
        _binary("smtp-source"),
        "-c",
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        CLIENT_NAME,
        *(["-d"] if reuse else []),
        f"{HOST}:{port}",
    ]
    started = time.perf_counter()
    # Children reaped meanwhile are smtp-source alone: the probe and the
    # servers outlive it.
    reaped_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if on_start is not None:
            on_start()
        out, err = process.communicate(timeout=timeout)
    except BaseException:
        terminate(process, 5)
        raise
    elapsed = time.perf_counter() - started
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (reaped.ru_utime - reaped_before.ru_utime) + (
        reaped.ru_stime - reaped_before.ru_stime
    )
    counters = re.findall(r"\d+", out)
    completed = int(counters[-1]) if counters else 0
    if process.returncode != 0 or completed != count:
        raise BenchError(
            f"smtp-source failed (exit {process.returncode}, {completed} of {count} "
            f"DATA completed): {err.strip()[-500:]}"
        )
    return LoadResult(count, elapsed, completed, cpu)


# -- the latency probe --------------------------------------------------------------


@dataclass
class ProbeResult:
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def median(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


class Probe:
    """The probe child: paced messages timed from final dot to reply."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        rate: float,
        connections: int,
        limit: int,
        size: int,
    ) -> None:
        self.stop_file = workdir / f"probe-{port}.stop"
        self.stop_file.unlink(missing_ok=True)
        self.process: subprocess.Popen[str] | None = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "probe",
                "--port",
                str(port),
                "--rate",
                str(rate),
                "--connections",
                str(connections),
                "--limit",
                str(limit),
                "--size",
                str(size),
                "--stop-file",
                str(self.stop_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> ProbeResult:
        self.stop_file.touch()
        process, self.process = self.process, None
        if process is None:
            return ProbeResult()
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            terminate(process, 5)
            raise BenchError("the latency probe did not stop") from None
        if process.returncode != 0:
            raise BenchError(f"the latency probe failed: {err.strip()[-800:]}")
        data = json.loads(out)
        return ProbeResult(data["latencies"], data["accepted"], data["errors"])

    def abandon(self) -> None:
        process, self.process = self.process, None
        terminate(process, 5)


def _probe_body(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-/=\r\n"
    lines = [
        f"From: <{SENDER}>".encode(),
        f"To: <{RECIPIENT}>".encode(),
        b"Subject: latency probe",
        b"",
    ]
    head = b"\r\n".join(lines) + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return head + body.rpartition(b"\r\n")[0] + b"\r\n"


class _ProbeConnection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.expect(b"220")
        self.command(b"EHLO probe.example", b"250")

    def reply(self) -> bytes:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line

    def expect(self, code: bytes) -> None:
        line = self.reply()
        if not line.startswith(code):
            raise ConnectionError(f"expected {code!r}, got {line!r}")

    def command(self, text: bytes, code: bytes) -> None:
        self.sock.sendall(text + b"\r\n")
        self.expect(code)

    def send(self, body: bytes) -> float:
        self.command(f"MAIL FROM:<{SENDER}>".encode(), b"250")
        self.command(f"RCPT TO:<{RECIPIENT}>".encode(), b"250")
        self.command(b"DATA", b"354")
        self.sock.sendall(body)
        started = time.perf_counter()
        self.sock.sendall(b".\r\n")
        line = self.reply()
        elapsed = time.perf_counter() - started
        if not line.startswith(b"250"):
            raise ConnectionError(f"final dot answered {line!r}")
        return elapsed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        self.sock.close()


def probe_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="relaybench.py probe")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--stop-file", type=Path, required=True)
    args = parser.parse_args(argv)
    body = _probe_body(args.size)
    result = ProbeResult()
    lock = threading.Lock()
    interval = args.connections / args.rate

    def stopped() -> bool:
        return args.stop_file.exists() or result.accepted >= args.limit

    def run(offset: float) -> None:
        try:
            conn = _ProbeConnection(args.port)
        except OSError as error:
            with lock:
                result.errors.append(f"connect: {error}")
            return
        next_at = time.monotonic() + offset
        try:
            while not stopped():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at + interval, time.monotonic())
                if stopped():
                    break
                latency = conn.send(body)
                with lock:
                    result.latencies.append(latency)
                    result.accepted += 1
        except OSError as error:
            with lock:
                result.errors.append(str(error))
        finally:
            conn.close()

    threads = [
        threading.Thread(target=run, args=(i * interval / args.connections,))
        for i in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    json.dump(
        {
            "latencies": result.latencies,
            "accepted": result.accepted,
            "errors": result.errors,
        },
        sys.stdout,
    )
    return 0


# -- profiling ---------------------------------------------------------------------


class _Recorder:
    """A profiler attached to a process until ``stop()`` (SIGINT: it writes)."""

    def __init__(self, argv: list[str], output: Path, wait: float) -> None:
        self.output = output
        self._wait = wait
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(self._wait)
        except subprocess.TimeoutExpired:
            terminate(process, 5)


def _tool(name: str, install: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise BenchError(f"{name} is not installed ({install})")
    return binary


class PySpy(_Recorder):
    """``py-spy record`` on a process for the duration of a ``with`` block."""

    def __init__(
        self, pid: int, output: Path, rate: int = 100, *, gil: bool = False
    ) -> None:
        """``gil``: sample only the thread holding the GIL (Python CPU)."""
        binary = _tool("py-spy", "pip install py-spy")
        argv = [binary, "record", "--pid", str(pid), "--rate", str(rate)]
        argv += ["--format", "raw", "--output", str(output), "--nonblocking"]
        super().__init__([*argv, *(["--gil"] if gil else [])], output, wait=30)


class Perf(_Recorder):
    """``perf record -e cpu-clock -g`` on one process (kernel stacks included)."""

    def __init__(self, pid: int, output: Path) -> None:
        binary = _tool("perf", "Debian package linux-perf")
        argv = [binary, "record", "-e", "cpu-clock", "-g", "-p", str(pid)]
        super().__init__([*argv, "-o", str(output)], output, wait=60)

    def summary(self, top: int = 25) -> str:
        """Top symbols by self time, user ([.]) and kernel ([k]) alike."""
        done = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(self.output),
                "--no-children",
                "--sort",
                "sym",
                "-g",
                "none",
                "--stdio",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [
            line
            for line in done.stdout.splitlines()
            if line.strip() and not line.startswith("#")
        ]
        kernel = sum(
            float(line.split("%")[0]) for line in lines if "[k]" in line.split("%")[1]
        )
        return "\n".join([f"kernel symbols: {kernel:.1f}% of samples", *lines[:top]])


def summarize_profile(raw: Path, top: int = 20) -> str:
    """Shares per thread and per function from py-spy's collapsed stacks.

    The reactor thread's stacks start at ``<module>``; the queue writer's run
    through ``_write_loop``. Shares are of all samples of that thread (wall
    time while not idle, so time blocked in a system call counts).
    """
    threads: dict[str, tuple[dict[str, int], dict[str, int], list[int]]] = {}
    with contextlib.suppress(OSError), raw.open() as lines:
        for line in lines:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_short_frame(frame) for frame in stack.split(";")]
            if frames[0].startswith("<module>"):
                name = "reactor thread"
            elif any("_write_loop" in frame for frame in frames):
                name = "queue writer thread"
            else:
                name = "other threads"
            own, inclusive, total = threads.setdefault(name, ({}, {}, [0]))
            total[0] += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not threads:
        return "(no samples)"
    everything = sum(total[0] for _, _, total in threads.values())
    out = [f"{everything} samples"]
    for name, (own, inclusive, total) in sorted(
        threads.items(), key=lambda item: -item[1][2][0]
    ):
        out.append(f"{name}: {100 * total[0] / everything:.1f}% of samples")
        out.append("  self:")
        out.extend(_ranked(own, total[0], top))
        interesting = {
            frame: count
            for frame, count in inclusive.items()
            if "txstarttls/" in frame or frame.split(" (")[0] in _TWISTED_HOT
        }
        out.append("  inclusive (txstarttls and key Twisted frames):")
        out.extend(_ranked(interesting, total[0], top))
    return "\n".join(out)


_TWISTED_HOT = {
    "Logger.emit",
    "Connection.writeSomeData",
    "Connection.doRead",
    "Port.doRead",
    "Connection.connectionLost",
    "TLSMemoryBIOProtocol.dataReceived",
    "TLSMemoryBIOProtocol.write",
    "ReactorBase.runUntilCurrent",
}


def _ranked(table: dict[str, int], total: int, top: int) -> Iterator[str]:
    for name, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
        yield f"    {100 * count / total:5.1f}%  {name}"


def _short_frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``, lines merged."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if match is None:
        return frame.strip()
    name, path = match.groups()
    parts = Path(path).parts
    if "txstarttls" in parts:
        last = len(parts) - 1 - parts[::-1].index("txstarttls")
        short = "/".join(parts[last:])
    else:
        short = Path(path).name
    return f"{name} ({short})"


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        sys.exit(probe_main(sys.argv[2:]))
    sys.exit("usage: relaybench.py probe ... (used by the bench scripts)")
