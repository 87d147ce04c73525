"""The replicator's error tree.

Every error carries a stable ``code`` (machine-readable), whether it is ``retryable`` and the
``exit_code`` the CLI returns for it. gRPC status codes are translated into these classes at the
client boundary (``transport/client.py``); ``grpc.aio.AioRpcError`` never leaks past it.
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Root of every error the replicator raises on purpose."""

    code = "replicator_error"
    retryable = False
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ReplicatorError, ValueError):
    """A bad flag or argument value."""

    code = "usage"
    exit_code = 2


class VolumeError(ReplicatorError, OSError):
    """The protected volume or the replica cannot be opened, read or written."""

    code = "volume_io"
    exit_code = 74  # EX_IOERR


class StateError(ReplicatorError):
    """The source's saved state is unreadable; it is set aside and rebuilt from the target."""

    code = "state_corrupt"
    exit_code = 74


class TargetUnavailableError(ReplicatorError, ConnectionError):
    """The target daemon cannot be reached (refused, reset, deadline)."""

    code = "target_unavailable"
    retryable = True
    exit_code = 69  # EX_UNAVAILABLE


class ProtocolError(ReplicatorError):
    """The peer sent something this side cannot accept (version, volume, geometry)."""

    code = "protocol"
    exit_code = 76  # EX_PROTOCOL


class StaleEpochError(ReplicatorError):
    """The replica has accepted a newer epoch: this source has been fenced."""

    code = "stale_epoch"
    exit_code = 77  # EX_NOPERM


class PermissionDeniedError(ReplicatorError):
    """The target refused this caller: its certificate's site (or operator) may not do that
    to this volume (docs/security.md)."""

    code = "permission_denied"
    exit_code = 77  # EX_NOPERM


class EpochNotGrantedError(ReplicatorError):
    """The target refused an epoch that no valid controller token grants to this site."""

    code = "epoch_not_granted"
    exit_code = 77  # EX_NOPERM


class VolumeNotFoundError(ReplicatorError):
    """The target holds no replica of that volume (only a handshake creates one)."""

    code = "volume_not_found"
    exit_code = 66  # EX_NOINPUT: no such replica


class QuotaExceededError(ReplicatorError):
    """The target refuses to create more than it was started to allow (``serve --max-volumes``,
    ``--max-clones``)."""

    code = "quota_exceeded"
    exit_code = 75  # EX_TEMPFAIL: room may be made (a clone dropped, a replica removed)


class VolumeBusyError(ReplicatorError):
    """Another source stream holds the volume on the target."""

    code = "volume_busy"
    retryable = True
    exit_code = 75  # EX_TEMPFAIL


class CorruptBatchError(ReplicatorError):
    """A delta batch failed its checksum or block-hash checks; it is rejected and resent."""

    code = "corrupt_batch"
    retryable = True
    exit_code = 76

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReplanNeededError(ReplicatorError):
    """The target's replica changed identity under us; plan again from its real content."""

    code = "replan"
    retryable = True
    exit_code = 75


class VerificationError(ReplicatorError):
    """The replica does not equal the source."""

    code = "verify_mismatch"
    exit_code = 1


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: the first ReplicatorError inside, else the group
    itself (cancellation and bugs are never turned into an error message)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = unwrap_group(exc)
            if isinstance(inner, ReplicatorError):
                return inner
        elif isinstance(exc, ReplicatorError):
            return exc
    return group


ALL_ERRORS: tuple[type[ReplicatorError], ...] = (
    ReplicatorError,
    UsageError,
    VolumeError,
    StateError,
    TargetUnavailableError,
    ProtocolError,
    StaleEpochError,
    PermissionDeniedError,
    EpochNotGrantedError,
    VolumeNotFoundError,
    QuotaExceededError,
    VolumeBusyError,
    CorruptBatchError,
    ReplanNeededError,
    VerificationError,
)


class StreamRefused(Exception):
    """The security layer refused a message of a Push stream (an epoch no token granted).
    Raised from the stream's iterator, which the handler reads on a task of its own; the
    handler ends the call with ``status`` (a grpc.StatusCode) from its own task, once no
    acknowledgement is being written (an abort from the reading task could race a write
    and leave the call hanging until its deadline). Internal to the target: never reaches a
    command line, so not a ReplicatorError."""

    def __init__(self, status: object, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
