"""The failover package's error tree: stable codes, retryability, HTTP status, CLI exit code."""

from __future__ import annotations


class FailoverError(Exception):
    """Root of every error the failover package raises on purpose (for example a request
    that cannot be queued because another one is still pending)."""

    code = "failover_error"
    retryable = False
    http_status = 500
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StoreUnavailableError(FailoverError, ConnectionError):
    """etcd cannot be reached (all endpoints refused or timed out)."""

    code = "store_unavailable"
    retryable = True
    http_status = 503
    exit_code = 69


class StoreRefusedError(StoreUnavailableError, PermissionError):
    """etcd answered and refused us: no or wrong credentials, a role without permission on
    the cluster's prefix, or a TLS handshake that failed (untrusted certificate, TLS expected).
    Retrying does not help; the configuration's ``etcd:`` must change. A command stops on it
    (77); a daemon checks before it starts, and a refusal while it runs (a password changed
    under it) is etcd out of reach to it, hence the subclass: agents fence, controllers step
    down, both retry."""

    code = "store_refused"
    retryable = False
    http_status = 503
    exit_code = 77  # EX_NOPERM


class CompactedError(FailoverError):
    """A watch asked for history etcd has compacted away; re-read a snapshot and watch on."""

    code = "compacted"
    retryable = True
    http_status = 500
    exit_code = 75


class LeaseLostError(FailoverError, TimeoutError):
    """Our lease expired or could not be renewed before the local deadline."""

    code = "lease_lost"
    retryable = True
    http_status = 503
    exit_code = 75


class InvalidTransition(FailoverError):
    """The state machine has no row for this (state, event) pair."""

    code = "invalid_transition"
    http_status = 409
    exit_code = 65


class DnsUpdateRefused(FailoverError):
    """An authoritative server refused the signed update (REFUSED, NOTAUTH, bad TSIG...)."""

    code = "dns_update_refused"
    http_status = 502
    exit_code = 70


class DnsVerifyTimeout(FailoverError, TimeoutError):
    """Not every authoritative server answered the new address in time."""

    code = "dns_verify_timeout"
    retryable = True
    http_status = 504
    exit_code = 75


ALL_ERRORS: tuple[type[FailoverError], ...] = (
    FailoverError, StoreUnavailableError, StoreRefusedError, CompactedError, LeaseLostError,
    InvalidTransition, DnsUpdateRefused, DnsVerifyTimeout,
)
