"""API users: names, roles and tokens (`drctl api users add|remove|list`).

Roles, each allowed what the one below is:

  viewer    read the status (GET /api/v1/status)
  operator  drill, switchover, failback
  admin     failover (--force too), retry, cancel

A token is ``<name>.<43 random url-safe characters>`` (256 bits), printed once by `users add`;
the users file (JSON, mode 0600, written atomically) keeps only a salted scrypt hash of it::

  {"version": 1, "users": {"alice": {"role": "admin",
                                     "token_hash": "scrypt$16384$8$1$<salt b64>$<hash b64>"}}}

The API re-reads the file when it changes (a user added or removed takes effect at once) and
refuses to read one that group or others may access. A verified token is remembered (by its
SHA-256, in memory) until the file changes, so scrypt runs once per token, not per request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from drctl.files import atomic_write
from failover.errors import FailoverError

ROLES = ("viewer", "operator", "admin")
# what each request needs
NEEDS = {"status": "viewer", "drill": "operator", "switchover": "operator",
         "failback": "operator", "failover": "admin", "retry": "admin", "cancel": "admin"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_@-]{0,63}$")
_N, _R, _P = 1 << 14, 8, 1  # scrypt: 16 MiB, ~30 ms


class UsersFileError(FailoverError):
    """The API's users file (or --token-file) cannot be used: unreadable, malformed, an
    unknown user, a token too short."""

    code = "users_file"
    exit_code = 2


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def may(self, request: str) -> bool:
        """May this user make ``request`` (a key of NEEDS)?"""
        return ROLES.index(self.role) >= ROLES.index(NEEDS[request])


def hash_token(token: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_token(token: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(token.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsersFileError(f"user name {name!r}: letters, digits, _ @ - (up to 64), "
                             "starting with a letter or digit")


def _read(path: str) -> dict[str, dict[str, str]]:
    """The users of ``path`` ({} if it does not exist); refused if group/others may read it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsersFileError(f"{path}: {exc.strerror}") from exc
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsersFileError(f"{path}: a directory, not a users file")
    with os.fdopen(fd, encoding="utf-8") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & 0o077:
            raise UsersFileError(f"{path}: mode {mode:04o}: group or others may access the "
                                 "users file (chmod 600)")
        try:
            doc: Any = json.load(fh)
        except ValueError as exc:
            raise UsersFileError(f"{path}: not a users file: {exc}") from exc
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, dict) or not all(
            isinstance(u, dict) and u.get("role") in ROLES
            and isinstance(u.get("token_hash"), str) for u in users.values()):
        raise UsersFileError(f"{path}: not a users file (expected {{\"users\": {{name: "
                             f"{{\"role\": {'|'.join(ROLES)}, \"token_hash\": ...}}}}}})")
    return users


def _write(path: str, users: dict[str, dict[str, str]]) -> None:
    try:
        atomic_write(path, (json.dumps({"version": 1, "users": users}, indent=1,
                                       sort_keys=True) + "\n").encode())
    except OSError as exc:  # the file is written beside itself (a temporary, renamed)
        directory = os.path.dirname(os.path.abspath(path))
        why = (f"directory {directory} does not exist" if not os.path.isdir(directory)
               else exc.strerror or str(exc))
        raise UsersFileError(f"{path}: cannot write the users file: {why}") from None


def add_user(path: str, name: str, role: str, replace: bool = False) -> str:
    """Add (or with ``replace``, give a new token to) a user; returns the new token, which
    is nowhere else: the file keeps its hash."""
    _check_name(name)
    if role not in ROLES:
        raise UsersFileError(f"--role {role}: one of {', '.join(ROLES)}")
    users = _read(path)
    if name in users and not replace:
        raise UsersFileError(f"{path}: user {name} exists (--replace gives a new token)")
    token = f"{name}.{secrets.token_urlsafe(32)}"
    users[name] = {"role": role, "token_hash": hash_token(token)}
    _write(path, users)
    return token


def remove_user(path: str, name: str) -> None:
    users = _read(path)
    if users.pop(name, None) is None:
        raise UsersFileError(f"{path}: no user {name}")
    _write(path, users)


def list_users(path: str) -> list[User]:
    return [User(n, u["role"]) for n, u in sorted(_read(path).items())]


class Users:
    """Who a bearer token belongs to: users from a users file (re-read when it changes),
    and/or one fixed token (``--token-file``: the user ``admin``, role admin)."""

    def __init__(self, path: str | None = None, token: str | None = None,
                 token_user: User = User("admin", "admin")) -> None:
        if token is not None and len(token) < 16:
            raise UsersFileError("the API token must be at least 16 characters")
        if path is None and token is None:
            raise UsersFileError("no API users: pass --users FILE (or --token-file)")
        self.path = path
        self._token = token
        self._token_user = token_user
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, dict[str, str]] = {}
        self._known: OrderedDict[bytes, User | None] = OrderedDict()  # sha256(token) -> user
        if path is not None:
            self._users = _read(path)
            self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        if self.path is None:
            return
        stamp = self._stat()
        if stamp != self._stamp:
            self._known.clear()
            self._stamp = stamp
            try:
                self._users = _read(self.path)
            except UsersFileError:
                self._users = {}  # fail closed; the error is the API's to log
                raise

    async def authenticate(self, token: str) -> User | None:
        """The user a token belongs to, or None. Raises UsersFileError if the users file
        became unreadable (then nobody gets in until it is fixed)."""
        self._refresh()
        if self._token is not None and hmac.compare_digest(token.encode(),
                                                           self._token.encode()):
            return self._token_user
        key = hashlib.sha256(token.encode()).digest()
        if key in self._known:
            return self._known[key]
        name, _, _secret = token.partition(".")
        entry = self._users.get(name)
        user = None
        if entry is not None and await asyncio.to_thread(check_token, token,
                                                         entry["token_hash"]):
            user = User(name, entry["role"])
        self._known[key] = user
        while len(self._known) > 4096:
            self._known.popitem(last=False)
        return user
