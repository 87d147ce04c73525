"""Running one step that executes something (a hook, a health check) with its own timeout, and
what is kept of its output for the operation's record: the end of it, bounded, with every
secret the process knows replaced by ``***``."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from drctl.shell import ShellError, ShellTimeout, run_shell
from drctl.words import count
from failover.dns.rfc2136 import Server
from failover.steps import StepKind, StepSpec

OUTPUT_LIMIT = 1000  # characters of a step's output kept in the record (the end)
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PASSPHRASE|CREDENTIAL|_KEY$", re.I)


@dataclass(frozen=True)
class Outcome:
    # "done" | "skipped" (nothing to do: the output says why) | "failed" | "waiting" (not yet:
    # run it again at the next tick)
    status: str
    output: str = ""
    error: str | None = None
    seconds: float = 0.0


def env_secrets() -> list[str]:
    """Values of this process's environment variables whose names say they are secret."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def tail(text: str, secrets: Iterable[str] = (), limit: int = OUTPUT_LIMIT) -> str:
    """The end of ``text`` (at most ``limit`` characters), secrets replaced by ``***``."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


SITE_ADDRESS = "{site_address}"  # in http: and tcp:, the address of the site checking


class NoSiteAddress(RuntimeError):
    """A check names {site_address} where nothing says which site runs it (not retried)."""


def expand(target: str, env: dict[str, str]) -> str:
    """A health check's http: or tcp: with ``{site_address}`` replaced by the address of the
    site that runs it ($DRCTL_SITE_ADDRESS): a check of the new primary, whichever site that
    is (a failback checks the home site, not the standby the runbook was written for)."""
    if SITE_ADDRESS not in target:
        return target
    address = env.get("DRCTL_SITE_ADDRESS")
    if not address:
        raise NoSiteAddress(f"{target}: {SITE_ADDRESS} needs $DRCTL_SITE_ADDRESS (set where "
                            "a site runs it; drctl runbook check --site NAME)")
    host = f"[{address}]" if ":" in address else address  # an IPv6 address in a URL
    return target.replace(SITE_ADDRESS, host)


async def probe(spec: StepSpec, env: dict[str, str]) -> str:
    """One attempt of a health check (raises OSError, RuntimeError or TimeoutError)."""
    if spec.http:
        url = expand(spec.http, env)

        def get() -> int:
            try:
                with urllib.request.urlopen(url, timeout=spec.timeout) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:  # it answered, not 2xx
                raise RuntimeError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                raise RuntimeError(f"GET {url}: {exc.reason}") from None
        return f"HTTP {await asyncio.to_thread(get)} from {url}"
    if spec.tcp:
        where = expand(spec.tcp, env)
        try:
            addr = Server.parse(where)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None

        def connect() -> None:
            try:
                socket.create_connection((addr.host.strip("[]"), addr.port),
                                         spec.timeout).close()
            except OSError as exc:
                raise RuntimeError(f"connect {where}: {exc.strerror or exc}") from None
        await asyncio.to_thread(connect)
        return f"connected to {where}"
    out = await run_shell(spec.command or "true", env, spec.timeout)
    return out.strip() or "command ok"


async def health_check(spec: StepSpec, env: dict[str, str],
                       retrying: Callable[[str], None] | None = None) -> str:
    """The check with its retries; returns what the passing attempt said, or raises
    RuntimeError with every failed attempt's reason. ``retrying``: told of each failed
    attempt that another follows (``attempt 1 of 3 failed: ...; again in 5s``)."""
    failures: list[str] = []
    for attempt in range(spec.retries + 1):
        try:
            said = await asyncio.wait_for(probe(spec, env), spec.timeout + 1)
            return "\n".join([*failures, f"attempt {attempt + 1}: {said}"])
        except NoSiteAddress:
            raise  # the same next time: no retries
        except ShellError as exc:
            why = f"exit {exc.returncode}: {exc.output.strip()[-200:]}"
        except (OSError, RuntimeError, TimeoutError, ValueError,
                http.client.HTTPException) as exc:  # (a URL urllib cannot use: ValueError)
            why = str(exc) or (f"no answer within {spec.timeout + 1:g}s"  # (wait_for's)
                               if isinstance(exc, TimeoutError) else type(exc).__name__)
        failures.append(f"attempt {attempt + 1}: {why}")
        if attempt < spec.retries:
            if retrying is not None:
                retrying(f"attempt {attempt + 1} of {spec.retries + 1} failed: {why}; "
                         f"again in {spec.interval:g}s")
            await asyncio.sleep(spec.interval)
    raise RuntimeError("\n".join(failures))


def failed_attempts(text: str) -> str:
    """A failed health check's attempts ("attempt 1: ...\\nattempt 2: ...") in one line:
    "2 attempts failed; last: ..." (other text: its lines joined)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(line.startswith("attempt ") for line in lines):
        last = lines[-1].split(": ", 1)[-1]
        return last if len(lines) == 1 else f"{len(lines)} attempts failed; last: {last}"
    return " | ".join(lines)


async def run_step(spec: StepSpec, env: dict[str, str],
                   secrets: Iterable[str] = ()) -> Outcome:
    """Run a hook or a health check; never raises (the outcome says what happened)."""
    t0 = time.monotonic()
    secrets = [*secrets, *env_secrets()]

    def done(status: str, output: str, error: str | None = None) -> Outcome:
        return Outcome(status, tail(output, secrets),
                       tail(error, secrets, 300) if error else None,
                       round(time.monotonic() - t0, 3))

    try:
        if spec.kind is StepKind.HEALTH_CHECK:
            return done("done", await health_check(spec, env))
        return done("done", await run_shell(spec.run or "true", env, spec.timeout))
    except ShellTimeout as exc:
        return done("failed", exc.output, f"timed out after {spec.timeout:g}s: killed")
    except ShellError as exc:
        return done("failed", exc.output, f"exit status {exc.returncode}")
    except NoSiteAddress as exc:
        return done("failed", "", str(exc))
    except RuntimeError as exc:  # a health check's failed attempts
        return done("failed", str(exc), f"failed after {count(spec.retries + 1, 'attempt')}")
    except OSError as exc:
        return done("failed", "", f"cannot run it: {exc}")
    except Exception as exc:  # a bug: the step fails with it, the caller goes on
        return done("failed", "", f"{type(exc).__name__}: {exc}")
