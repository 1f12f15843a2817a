"""Exceptions of the modelstate client, one class per gRPC status code.

Every failure the server or the transport reports raises a subclass of
``modelstate.Error`` carrying the status code. Classes whose meaning has a
Python counterpart also subclass it, so code written for plain Python or for
``torch.nn.Module.load_state_dict`` keeps working: ``FailedPrecondition`` (the
server's torch-semantics refusals, e.g. "Error(s) in loading state_dict for
Net: ...") is a ``RuntimeError``, ``NotFound`` a ``LookupError``,
``InvalidArgument`` a ``ValueError``, ``DeadlineExceeded`` a ``TimeoutError``,
``Unavailable`` a ``ConnectionError``.
"""


class Error(Exception):
    """A call failed; ``code`` is the gRPC status code's name (``"NOT_FOUND"``),
    ``code_value`` its number, ``message`` the server's message."""

    code = "UNKNOWN"
    code_value = 2

    def __init__(self, message=""):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class Cancelled(Error):
    """The call was cancelled (CANCELLED)."""
    code, code_value = "CANCELLED", 1


class Unknown(Error):
    """An error without a better code (UNKNOWN)."""
    code, code_value = "UNKNOWN", 2


class InvalidArgument(Error, ValueError):
    """The request was malformed (INVALID_ARGUMENT)."""
    code, code_value = "INVALID_ARGUMENT", 3


class DeadlineExceeded(Error, TimeoutError):
    """The call's timeout passed (DEADLINE_EXCEEDED)."""
    code, code_value = "DEADLINE_EXCEEDED", 4


class NotFound(Error, LookupError):
    """No such model, module, key or retained version (NOT_FOUND)."""
    code, code_value = "NOT_FOUND", 5


class AlreadyExists(Error):
    """The model name is taken (ALREADY_EXISTS)."""
    code, code_value = "ALREADY_EXISTS", 6


class PermissionDenied(Error):
    """The caller may not do this (PERMISSION_DENIED)."""
    code, code_value = "PERMISSION_DENIED", 7


class ResourceExhausted(Error):
    """The server's memory limit or a size bound was hit (RESOURCE_EXHAUSTED)."""
    code, code_value = "RESOURCE_EXHAUSTED", 8


class FailedPrecondition(Error, RuntimeError):
    """torch refused the operation (strict keys, size mismatch); the message is
    torch's own text (FAILED_PRECONDITION)."""
    code, code_value = "FAILED_PRECONDITION", 9


class VersionConflict(Error):
    """The model is not at ``expected_version`` (ABORTED)."""
    code, code_value = "ABORTED", 10


class OutOfRange(Error):
    """A value out of range (OUT_OF_RANGE)."""
    code, code_value = "OUT_OF_RANGE", 11


class Unimplemented(Error):
    """The server does not support this (UNIMPLEMENTED)."""
    code, code_value = "UNIMPLEMENTED", 12


class Internal(Error):
    """The server broke an invariant (INTERNAL)."""
    code, code_value = "INTERNAL", 13


class Unavailable(Error, ConnectionError):
    """The server cannot be reached or the connection dropped (UNAVAILABLE)."""
    code, code_value = "UNAVAILABLE", 14


class DataLoss(Error):
    """Bytes arrived corrupted or the stream was cut short (DATA_LOSS)."""
    code, code_value = "DATA_LOSS", 15


class Unauthenticated(Error):
    """The caller has no valid credentials (UNAUTHENTICATED)."""
    code, code_value = "UNAUTHENTICATED", 16


_BY_CODE = {cls.code_value: cls for cls in (
    Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound,
    AlreadyExists, PermissionDenied, ResourceExhausted, FailedPrecondition,
    VersionConflict, OutOfRange, Unimplemented, Internal, Unavailable,
    DataLoss, Unauthenticated)}

__all__ = ["Error"] + [cls.__name__ for cls in _BY_CODE.values()]


def from_status(code, message):
    """Returns the exception for a status code (an int) and message; the C++
    extension raises what this returns."""
    return _BY_CODE.get(code, Unknown)(message)
