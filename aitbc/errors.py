"""One exception tree for the whole core; servers map it to gRPC statuses in one place (aitbc.rpc),
and clients map a status back to its class there too (aitbc.rpc.error_from_rpc).

Every gRPC status but OK has one class below whose `code` is its name, so an error that crossed
the wire comes back as the class it was raised as (or the nearest: a CryptoError arrives as
InvalidArgument). Catching by class is catching by status."""

from __future__ import annotations


class AitbcError(Exception):
    """Base of every error the core raises on purpose. `code` names the gRPC status it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AitbcError):
    """A bad request. `field` names the request field at fault when the error is about one (a proto
    field path such as "params.image.steps"): servers send it as a google.rpc.BadRequest field
    violation beside the unchanged message, and aitbc.rpc.error_from_rpc reads it back."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def within(self, path: str) -> InvalidArgument:
        """The same error seen from an enclosing message: `path` + "." + its field (or `path` when
        it named none). Returns self, for `raise exc.within("params.image")`."""
        self.field = f"{path}.{self.field}" if self.field else path
        return self


class NotFound(AitbcError):
    code = "NOT_FOUND"


class AlreadyExists(AitbcError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(AitbcError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(AitbcError):
    code = "PERMISSION_DENIED"


class Unauthenticated(AitbcError):
    code = "UNAUTHENTICATED"


class ResourceExhausted(AitbcError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(AitbcError):
    code = "UNAVAILABLE"


class DeadlineExceeded(Unavailable):
    """The call's deadline passed first. A subclass of Unavailable: like it, worth retrying, and
    `except Unavailable` (settlement, the wallet) keeps treating a slow node as an unreachable one."""

    code = "DEADLINE_EXCEEDED"


class Aborted(AitbcError):
    code = "ABORTED"


class Cancelled(AitbcError):
    code = "CANCELLED"


class OutOfRange(AitbcError):
    code = "OUT_OF_RANGE"


class Unimplemented(AitbcError):
    code = "UNIMPLEMENTED"


class Internal(AitbcError):
    """A server bug or broken invariant (what the base class's code says too)."""

    code = "INTERNAL"


class Unknown(AitbcError):
    """The server answered UNKNOWN: grpcio's status for an exception a servicer did not map."""

    code = "UNKNOWN"


class DataLoss(AitbcError):
    """Data that arrived corrupt (an artifact whose bytes do not match its sha256)."""

    code = "DATA_LOSS"


class CryptoError(InvalidArgument):
    """A key, address or signature that does not verify."""


class ReceiptError(InvalidArgument):
    """A receipt that is malformed or whose signatures do not verify."""
