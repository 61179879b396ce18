"""A private, throwaway Postfix for interop tests.

Real mail software is the reference our client must get along with, so the
tests run a genuine Postfix: its own configuration and queue directories
under a fresh temporary directory, listening on 127.0.0.1 only, offering
STARTTLS with a certificate from the test CA and Cyrus SASL AUTH (PLAIN,
LOGIN) only after STARTTLS, and delivering mail for ``test.example`` into a
Maildir a test can read. Nothing outside the temporary directory is changed
and the system instance is never started.

Postfix needs root: it drops to the ``postfix`` user per process and insists
on root-owned queue directories.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import grp
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.requirements import find_binary

MAIL_DOMAIN = "test.example"
TLS_HOSTNAME = "mx.test.example"
KEEP_ENV = "TXSTARTTLS_KEEP_POSTFIX"

_START_ATTEMPTS = 3
_COMMAND_TIMEOUT = 60.0
_GREETING_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_POLL = 0.05

# Every service runs unchrooted ("n" in column 5): a chroot would need copies
# of the sasldb, resolv.conf and friends inside the queue directory.
_MASTER_CF = """\
{listen} inet n - n - - smtpd
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
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

# Anything not for test.example goes to the error transport: the instance
# must never try to reach another host, not even for a bounce. Recipients
# are only accepted from authenticated clients, so a delivery proves AUTH.
_MAIN_CF = """\
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {maillog}
maillog_file_prefixes = {root}
myhostname = {tls_hostname}
mydomain = {domain}
myorigin = $myhostname
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
default_transport = error:mail outside {domain} is not delivered by this test server
relay_transport = $default_transport
smtpd_banner = $myhostname ESMTP txstarttls test Postfix
smtpd_peername_lookup = no
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {sasl}
smtpd_sasl_local_domain = {domain}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_authenticated_header = yes
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
"""

_SMTPD_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: {sasldb}
mech_list: PLAIN LOGIN
"""


class PostfixError(RuntimeError):
    """Postfix could not be set up, started or stopped."""


def delivered_to(message: bytes) -> str:
    """The (lower-cased) recipient virtual(8) delivered ``message`` for."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return str(parsed.get("Delivered-To", "")).strip().lower()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _process_alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _has_environ(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


class PostfixInstance:
    """A private Postfix on 127.0.0.1: a context manager.

    After ``start()`` (or entering), ``host``/``port`` take mail for
    ``anything@test.example`` from ``username``/``password`` after STARTTLS;
    the server certificate verifies against ``ca_file`` for ``tls_hostname``.
    Every recipient's copy lands in one Maildir with a ``Delivered-To``
    header, so tests sharing one instance stay apart by using distinct
    recipients (or predicates).
    """

    host = "127.0.0.1"
    tls_hostname = TLS_HOSTNAME
    mail_domain = MAIL_DOMAIN

    def __init__(
        self,
        *,
        cert_file: Path,
        key_file: Path,
        ca_file: Path,
        username: str = "txstarttls",
        password: str | None = None,
    ) -> None:
        self.ca_file = ca_file
        self.username = username
        # Hex, not URL-safe base64: one starting with "-" (1 in 64) reads to
        # swaks as an option, and the interop test failed now and then.
        self.password = password or secrets.token_hex(12)
        self._cert_file = cert_file
        self._key_file = key_file
        self._root: Path | None = None
        self._port: int | None = None
        self._master: subprocess.Popen[bytes] | None = None

    # -- what tests use -----------------------------------------------------

    @property
    def port(self) -> int:
        """The SMTP port; only valid while running."""
        if self._port is None:
            raise PostfixError("Postfix is not running")
        return self._port

    @property
    def root(self) -> Path:
        """The temporary directory holding everything of this instance."""
        if self._root is None:
            raise PostfixError("Postfix is not set up")
        return self._root

    @property
    def maildir(self) -> Path:
        """The Maildir every accepted message is delivered into."""
        return self.root / "mail" / "inbox"

    def address(self, local_part: str = "someone") -> str:
        """A recipient address this instance delivers into its Maildir."""
        return f"{local_part}@{self.mail_domain}"

    def maillog(self) -> str:
        """Everything Postfix has logged so far."""
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except (OSError, PostfixError):
            return ""

    def maillog_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the mail log, for assertion messages."""
        return "\n".join(self.maillog().splitlines()[-lines:])

    def messages(self, recipient: str | None = None) -> list[bytes]:
        """Delivered messages so far, oldest first, optionally for one recipient.

        Only ``new/`` and ``cur/`` count: Maildir delivery writes into
        ``tmp/`` and renames, so a file seen here is always complete.
        """
        files: list[Path] = []
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                files.extend((self.maildir / sub).iterdir())
        found: list[tuple[float, str, bytes]] = []
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_mtime, path.name, path.read_bytes()))
        return [
            data
            for _, _, data in sorted(found)
            if recipient is None or delivered_to(data) == recipient.lower()
        ]

    def wait_for_message(
        self,
        count: int = 1,
        *,
        predicate: Callable[[bytes], bool] | None = None,
        recipient: str | None = None,
        timeout: float = 20.0,
    ) -> list[bytes]:
        """Block until ``count`` delivered messages match; return all matches.

        Raises ``AssertionError`` carrying the maillog tail on timeout. Blocks
        the calling thread: from a Twisted test whose reactor must keep
        running (a relay still forwarding), use ``await_message`` instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self._matching(predicate, recipient)
            if len(found) >= count or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        if len(found) < count:
            raise AssertionError(self._not_delivered(count, found, timeout))
        return found

    async def await_message(
        self,
        count: int = 1,
        *,
        predicate: Callable[[bytes], bool] | None = None,
        recipient: str | None = None,
        timeout: float = 20.0,
    ) -> list[bytes]:
        """Like ``wait_for_message`` but lets the Twisted reactor run meanwhile."""
        from twisted.internet import reactor, task

        deadline = time.monotonic() + timeout
        while True:
            found = self._matching(predicate, recipient)
            if len(found) >= count or time.monotonic() >= deadline:
                break
            await task.deferLater(reactor, _POLL)
        if len(found) < count:
            raise AssertionError(self._not_delivered(count, found, timeout))
        return found

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Configure and start Postfix; return once it sends its 220 greeting."""
        if self._root is not None:
            raise PostfixError("already started")
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root")
        try:
            self._configure()
            self._start_master()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop master and every process it started; remove the directory.

        Safe to call more than once, and after a failed start. With
        ``TXSTARTTLS_KEEP_POSTFIX=1`` the directory is kept for inspection.
        """
        root, self._root, self._port = self._root, None, None
        if root is None:
            return
        self._stop_master()
        # Whatever survived, or was left by a half-finished start: kill it.
        self._kill_leftovers(root / "etc")
        if os.environ.get(KEEP_ENV) != "1":
            shutil.rmtree(root, ignore_errors=True)

    # -- internals ----------------------------------------------------------

    def _matching(
        self, predicate: Callable[[bytes], bool] | None, recipient: str | None
    ) -> list[bytes]:
        found = self.messages(recipient)
        return found if predicate is None else [m for m in found if predicate(m)]

    def _not_delivered(self, count: int, found: list[bytes], timeout: float) -> str:
        return (
            f"expected {count} matching message(s) within {timeout:g}s, "
            f"found {len(found)} (of {len(self.messages())} delivered)\n"
            f"--- maillog tail ---\n{self.maillog_tail()}"
        )

    def _binary(self, name: str) -> str:
        found = find_binary(name)
        if found is None:
            raise PostfixError(f"{name} is not installed")
        return found

    def _configure(self) -> None:
        # Not pytest's tmp_path: that lives under a 0700 directory the
        # postfix user cannot enter, and Postfix wants root-owned, not
        # group/world-writable directories around its queue.
        root = Path(tempfile.mkdtemp(prefix="txstarttls-postfix-", dir="/tmp"))
        self._root = root
        root.chmod(0o755)
        owner = pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")  # setgid_group: fail clearly here

        etc, queue, tls, mail = (root / n for n in ("etc", "queue", "tls", "mail"))
        # Debian's smtpd reads smtpd.conf from $config_directory/sasl, whatever
        # cyrus_sasl_config_path says (set too, for other builds). It reads
        # it as root, but the password database later as the postfix user.
        sasl, sasldb_dir = etc / "sasl", root / "sasldb"
        for directory in (etc, queue, sasl, tls, mail, sasldb_dir):
            directory.mkdir(mode=0o755)

        cert, key = tls / "server.crt", tls / "server.key"
        shutil.copyfile(self._cert_file, cert)
        shutil.copyfile(self._key_file, key)
        key.chmod(0o600)  # smtpd reads it as root, before dropping privileges

        sasldb = sasldb_dir / "sasldb2"
        (sasl / "smtpd.conf").write_text(_SMTPD_CONF.format(sasldb=sasldb))
        self._run(
            self._binary("saslpasswd2"),
            *("-f", str(sasldb), "-c", "-p", "-u", self.mail_domain, self.username),
            input=self.password,
        )
        # virtual(8) writes mail, and smtpd checks passwords, as postfix.
        for path in (mail, sasldb_dir, *sasldb_dir.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
            path.chmod(0o700 if path.is_dir() else 0o600)

        (etc / "main.cf").write_text(
            _MAIN_CF.format(
                etc=etc,
                queue=queue,
                data=root / "data",
                maillog=root / "maillog",
                root=root,
                tls_hostname=self.tls_hostname,
                domain=self.mail_domain,
                cert=cert,
                key=key,
                sasl=sasl,
                mail=mail,
                uid=owner.pw_uid,
                gid=owner.pw_gid,
            )
        )
        (etc / "master.cf").write_text(_MASTER_CF.format(listen=f"{self.host}:25"))
        # "postfix check" creates the queue and data directories with the
        # right owners, as "postfix start" would, and validates the setup.
        self._run(self._binary("postfix"), "-c", str(etc), "check")

    def _start_master(self) -> None:
        """Run master as our own child, in the foreground.

        ``postfix start`` would daemonize it, leaving a zombie for init to
        reap after every stop; as a direct child it is reaped by us, and its
        own session keeps its SIGTERM to its process group off pytest.
        """
        etc = self.root / "etc"
        daemon_directory = subprocess.run(
            [self._binary("postconf"), "-c", str(etc), "-h", "daemon_directory"],
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=True,
        ).stdout.strip()
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port(self.host)
            (etc / "master.cf").write_text(
                _MASTER_CF.format(listen=f"{self.host}:{port}")
            )
            log_start = len(self.maillog())
            self._master = subprocess.Popen(
                [f"{daemon_directory}/master", "-c", str(etc), "-d"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"MAIL_CONFIG": str(etc), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                start_new_session=True,
            )
            self._port = port
            if self._wait_for_greeting():
                return
            self._stop_master()
            # Another process may have taken the port between probe and bind.
            if "in use" not in self.maillog()[log_start:] or attempt == _START_ATTEMPTS:
                raise PostfixError(
                    f"Postfix did not greet on {self.host}:{port}\n"
                    f"--- maillog tail ---\n{self.maillog_tail()}"
                )

    def _wait_for_greeting(self) -> bool:
        """Poll until the SMTP port answers ``220``; False if master died."""
        assert self._master is not None
        deadline = time.monotonic() + _GREETING_TIMEOUT
        while time.monotonic() < deadline and self._master.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=2) as s,
            ):
                s.settimeout(max(0.1, deadline - time.monotonic()))
                if s.makefile("rb").readline().startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    return True
            time.sleep(_POLL)
        return False

    def _stop_master(self) -> None:
        master, self._master = self._master, None
        if master is None:
            return
        master.terminate()  # master passes SIGTERM on to its process group
        try:
            master.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(_STOP_TIMEOUT)

    @staticmethod
    def _kill_leftovers(etc: Path) -> None:
        """SIGKILL every process carrying this instance's MAIL_CONFIG.

        Master passes MAIL_CONFIG on to every daemon it spawns, so it marks
        exactly this instance's processes and nothing else on the machine.
        """
        marker = f"MAIL_CONFIG={etc}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            if _process_alive(pid) and _has_environ(pid, marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _run(self, *argv: str, input: str | None = None) -> None:
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n"
                f"--- maillog tail ---\n{self.maillog_tail()}"
            )
