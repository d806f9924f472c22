"""One exception tree for the whole core; servers map it to gRPC statuses in one place (aitbc.rpc)."""

from __future__ import annotations


class AitbcError(Exception):
    """Base of every error the core raises on purpose. `code` names the gRPC status it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AitbcError):
    code = "INVALID_ARGUMENT"


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


class Aborted(AitbcError):
    code = "ABORTED"


class CryptoError(InvalidArgument):
    """A key, address or signature that does not verify."""


class ReceiptError(InvalidArgument):
    """A receipt that is malformed or whose signatures do not verify."""
