"""CurveZMQ between the daemon and its workers: who may take frames, and who may send results.

Off by default (sockets listen on localhost only). When `workers.curve_secret_key` is set, the
daemon's worker socket is a CURVE server that accepts only the public keys in
`workers.authorized_keys` (a directory of `*.key` files from `pipeline keys generate`) plus its
own, which its local workers use. An unlisted peer fails the handshake: it is sent no frame and
nothing it sends reaches the dispatcher.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from pipeline.config import WorkerSettings
from pipeline.errors import UserError

log = logging.getLogger(__name__)


class KeyPairExists(UserError):
    """`pipeline keys generate` would replace a key pair that may be in use."""


def generate_keys(directory: Path, name: str, replace: bool = False) -> tuple[Path, Path]:
    """A new key pair: `<name>.key` (public, to share) and `<name>.key_secret` (keep private).

    A pair already there is kept unless `replace`: running the deployment step again would otherwise lock out every
    worker holding the old public key at the daemon's next start. The secret file is 0600 from its first byte
    (pyzmq's `create_certificates` writes it with the umask's mode, readable by others until a chmod)."""
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [path for path in (public, secret) if path.exists()]
    if existing and not replace:
        raise KeyPairExists(f"{existing[0]}: exists (workers and daemons that hold this pair would be refused with a new one); "
                            "give --force to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    public_key, secret_key = (key.decode("ascii") for key in zmq.curve_keypair())
    made = f"#   ZeroMQ CURVE {{}} Certificate, made by `pipeline keys generate` {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    _write_private(secret, made.format("**Secret**") + "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"
                   f'\nmetadata\ncurve\n    public-key = "{public_key}"\n    secret-key = "{secret_key}"\n', mode=0o600)
    _write_private(public, made.format("Public") + f'\nmetadata\ncurve\n    public-key = "{public_key}"\n', mode=0o644)
    return public, secret


def _write_private(path: Path, text: str, mode: int) -> None:
    """`text` into `path` whole (a temporary file renamed over it) with `mode` from creation on."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(descriptor, mode)  # the umask may have taken bits the public file needs
        os.write(descriptor, text.encode("ascii"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


class KeyFileError(UserError):
    """A CurveZMQ key file that cannot be used: named in one line at start-up, before any socket is made; a bad value of
    the config (exit code 2), as a key the config names."""


def _load(key_file: Path, setting: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(key_file)
    except (OSError, ValueError) as error:  # missing, unreadable, or no key in it (pyzmq: "No public key found in ...")
        why = error.strerror if isinstance(error, OSError) and error.strerror else "holds no CurveZMQ key"
        raise KeyFileError(f"workers.{setting} {key_file}: {why} (make key pairs with `pipeline keys generate NAME`)") from None


def _check_private(secret_file: Path) -> None:
    """Refuse a secret key that others may read or change, as ssh refuses such a private key: copied to the shared file
    system with the umask's mode (0644), it lets anyone who can read it pose as the daemon or a worker. A file root
    owns is taken as root made it (a Kubernetes Secret volume, configuration management): its mode was root's choice."""
    try:
        info = os.stat(secret_file)
    except OSError:
        return  # gone since it was read: the socket that uses it fails instead
    if info.st_uid == 0 and os.getuid() != 0:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        open_to = "readable" if mode & 0o044 else "writable" if mode & 0o022 else "open"
        raise KeyFileError(f"workers.curve_secret_key {secret_file}: {open_to} by others (mode {mode:04o}): a secret key must be "
                           f"its owner's alone; chmod 600 {secret_file}")


def _keys(secret_file: Path) -> tuple[bytes, bytes]:
    public, secret = _load(secret_file, "curve_secret_key")
    if secret is None:
        raise KeyFileError(f"workers.curve_secret_key {secret_file}: holds no secret key (use the .key_secret file)")
    _check_private(secret_file)
    return public, secret


def client_keys(settings: WorkerSettings) -> tuple[bytes, bytes, bytes] | None:
    """A worker's (public, secret, daemon's public) keys, or None without CurveZMQ; KeyFileError names a bad file.
    Called before the worker's socket thread starts, so a bad file stops the worker with one line."""
    if settings.curve_secret_key is None:
        return None
    public, secret = _keys(settings.curve_secret_key)
    if settings.server_public_key is None:  # a local worker: the daemon's own key pair
        return public, secret, public
    return public, secret, _load(settings.server_public_key, "server_public_key")[0]


REFUSAL_REPEAT_S = 60.0  # a refused key is logged again at most this often (a peer retrying must not flood the log)
MAX_REFUSED_KEYS = 1000  # keys remembered for that; beyond it the memory starts again


class RefusalLoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator, saying why it refused a worker. Why: libzmq refuses an unknown key silently on both
    sides (the worker retries for ever, the daemon logs nothing), so a worker whose public key was not copied into
    `workers.authorized_keys` looked like a network problem."""

    def __init__(self, context: zmq.Context, allowed_from: str) -> None:
        super().__init__(context)
        self.allowed_from = allowed_from
        self._address = "?"
        self._last_said: dict[bytes, float] = {}

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:  # [version, request id, domain, address, ...]: one request at a time, on this one thread
            self._address = msg[3].decode(errors="replace")[:64]
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            now = time.monotonic()
            if now - self._last_said.get(client_key, -REFUSAL_REPEAT_S) >= REFUSAL_REPEAT_S:
                if len(self._last_said) >= MAX_REFUSED_KEYS:
                    self._last_said.clear()
                self._last_said[client_key] = now
                log.warning("refused a worker from %s: its CurveZMQ public key %s is not among the keys allowed (%s); "
                            "it gets no frames", self._address, z85.encode(client_key).decode(), self.allowed_from)
        return allowed, reason


class CurveServer:
    """Authentication for the daemon's worker socket; keeps its authenticator thread."""

    def __init__(self, settings: WorkerSettings, context: zmq.Context, private_folder: Path) -> None:
        """`private_folder`: only this user can open it (the daemon's RunFolder); the allowed keys are copied there."""
        if settings.curve_secret_key is None:
            raise ValueError("CurveServer needs workers.curve_secret_key")
        self.public, self.secret = _keys(settings.curve_secret_key)
        self._allowed = private_folder / "allowed-keys"
        self._allowed.mkdir(mode=0o700)
        if settings.authorized_keys is not None:
            for key in sorted(Path(settings.authorized_keys).glob("*.key")):
                shutil.copy(key, self._allowed / key.name)
        # the daemon's own public key, in ZeroMQ's certificate format, so its local workers get in
        (self._allowed / "daemon-itself.key").write_text(f'metadata\ncurve\n    public-key = "{self.public.decode()}"\n')
        allowed = len(zmq.auth.load_certificates(self._allowed))
        where = f"workers.authorized_keys {settings.authorized_keys}" if settings.authorized_keys else "no workers.authorized_keys set"
        self.authenticator = RefusalLoggingAuthenticator(context, f"the daemon's own and {where}")
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(self._allowed))
        log.info("CurveZMQ on: %d public key(s) allowed (the daemon's own included)", allowed)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()
        shutil.rmtree(self._allowed, ignore_errors=True)


HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def handshake_failure(event: int, value: int, endpoint: str, public_key: bytes | None) -> str | None:
    """A worker's one line for a failed handshake with the daemon (a `HANDSHAKE_EVENTS` monitor event), else None.
    Why: libzmq says nothing on either side, so a worker whose key the daemon does not list just waited, "connected"."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        key = f"CurveZMQ public key {public_key.decode()}" if public_key else "connection"
        return (f"the daemon at {endpoint} refused this worker's {key} (ZAP status {value}): the daemon's "
                f"workers.authorized_keys must hold this worker's public key file (then restart the daemon)")
    if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        mine = "with" if public_key else "without"
        return (f"the handshake with the daemon at {endpoint} failed (ZeroMQ error {value}); this worker runs {mine} CurveZMQ: "
                f"do both sides use it (workers.curve_secret_key), with the daemon's own public key (workers.server_public_key)?")
    return None


def apply_client(sock: zmq.Socket, settings: WorkerSettings) -> None:
    """A worker's side: its own keys, and the daemon's public key (its own, for local workers)."""
    keys = client_keys(settings)
    if keys is None:
        return
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
