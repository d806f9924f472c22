"""gRPC plumbing shared by every server: error mapping at one boundary, server factory with
health and reflection, channel options, and the TLS switch.

TLS (docs/operations.md, "TLS"): a process calls `configure_tls(cert_file, key_file, ca_file)`
once at start from its own configuration. With a certificate and key, every server it starts
listens with TLS; with a CA file, every channel it opens (the sync SDK's too) uses TLS and checks
the server's certificate against that CA. Neither: plaintext, the default (a devnet on loopback)."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from aitbc import errors, telemetry
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, ResourceExhausted

log = logging.getLogger("aitbc.rpc")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # artifacts travel in chunks well under the 4 MiB default limit

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]

# A server that receives large streams from parties it does not trust (the coordinator: miners'
# uploads). With BDP probing on, gRPC grows each stream's receive window towards the link's
# bandwidth-delay product: on loopback 64 streams uploading at once took the coordinator's RSS
# ~2.2 GiB up (bench/upload_memory.py), and a larger fixed window (lookahead_bytes = 1 MiB) cost
# ~130 MiB more at the peak than the default 64 KiB. Off, what arrives at once is about one message
# per stream (~3.5 MiB with its copies), whatever the upload's size.
UPLOAD_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.http2.bdp_probe", 0),
]

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

# Calls grpc itself may send again when the answer is UNAVAILABLE (the server restarting, a
# connection dropped before the call reached a handler): reads only, whose repetition changes
# nothing. Never SubmitJob (a second job unless it carries a request id, which a service config
# cannot see), CancelJob, Register, BroadcastTransaction(s), SubmitVotes nor anything of the
# wallet that signs or sends; long-lived streams (WatchJob, StreamBlocks, Work) reconnect by
# their own loops.
RETRIED_READS: dict[str, tuple[str, ...]] = {
    "aitbc.v1.CoordinatorService": ("QuoteJob", "GetJob", "GetJobResult", "ListReceipts", "GetReceipt",
                                    "ListModels", "ListMiners"),
    "aitbc.v1.LedgerService": ("GetHead", "GetBlock", "GetTransaction", "GetAccount", "GetReceiptStatus",
                               "GetReceiptProof", "GetGenesis", "ListPeers"),
    "aitbc.v1.MinerService": ("GetChallenge",),
    "aitbc.v1.MinerOpsService": ("GetInfo",),
    "aitbc.v1.WalletService": ("ListWallets", "GetBalance"),
    "grpc.health.v1.Health": ("Check",),
}
# At most 3 attempts, grpc's own jittered exponential backoff between them (a wait drawn between
# 0 and 0.1 s, then 0.2 s, ...), and retry throttling so that a dead server does not get every
# call three times.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [{
        "name": [{"service": service, "method": method} for service, methods in RETRIED_READS.items()
                 for method in methods],
        "retryPolicy": RETRY_POLICY,
    }],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}
AIO_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *CHANNEL_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]


@dataclass(frozen=True)
class Tls:
    """The loaded TLS material of this process (PEM bytes); empty means plaintext that way."""

    cert_chain: bytes = b""
    private_key: bytes = b""
    root_certs: bytes = b""
    allow_insecure: bool = False  # serve plaintext beyond loopback (the operator said so in so many words)
    insecure_name: str = "allow_insecure"  # how the operator sets it (config key or flag)

    @property
    def serves(self) -> bool:
        return bool(self.cert_chain)

    @property
    def dials(self) -> bool:
        return bool(self.root_certs)


_tls = Tls()


def _read_pem(name: str, path: str, marker: bytes) -> bytes:
    from pathlib import Path

    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"{name} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise InvalidArgument(f"{name} {path} is not a PEM {marker.decode().strip('- ').lower()}")
    return data


CONFIG_NAMES = ("tls_cert_file", "tls_key_file", "tls_ca_file", "allow_insecure")
FLAG_NAMES = ("--tls-cert", "--tls-key", "--tls-ca", "--allow-insecure")


def configure_tls(cert_file: str = "", key_file: str = "", ca_file: str = "", *,
                  allow_insecure: bool = False, names: tuple[str, str, str, str] = CONFIG_NAMES) -> Tls:
    """Load this process's TLS material (see the module docstring); all empty turns TLS off.
    Raises InvalidArgument / FailedPrecondition naming the setting (`names`: how the user set
    them, config keys or command-line flags), the file and what is wrong with it."""
    global _tls
    cert_name, key_name, ca_name, insecure_name = names
    if bool(cert_file) != bool(key_file):
        raise InvalidArgument(f"set both {cert_name} and {key_name} to serve TLS (or neither for plaintext)")
    _tls = Tls(
        cert_chain=_read_pem(cert_name, cert_file, b"CERTIFICATE") if cert_file else b"",
        private_key=_read_pem(key_name, key_file, b"PRIVATE KEY") if key_file else b"",
        root_certs=_read_pem(ca_name, ca_file, b"CERTIFICATE") if ca_file else b"",
        allow_insecure=allow_insecure, insecure_name=insecure_name,
    )
    return _tls


def refuse_plaintext(listen: str) -> None:
    """Plaintext only on loopback unless the operator said otherwise (THREAT-MODEL.md)."""
    if not _tls.serves and not _tls.allow_insecure and not is_loopback(listen):
        raise FailedPrecondition(
            f"refusing to serve plaintext on {listen}: beyond loopback set {CONFIG_NAMES[0]}/{CONFIG_NAMES[1]} "
            f"({FLAG_NAMES[0]}/{FLAG_NAMES[1]}) to serve TLS, or {_tls.insecure_name} to serve plaintext anyway "
            "(docs/operations.md, TLS)")


def is_unix(listen: str) -> bool:
    """Whether a listen address or target is a unix socket (`unix:PATH`), reachable only through
    the filesystem (its folder's and its own permissions decide who may connect)."""
    return listen.startswith("unix:")


def is_loopback(listen: str) -> bool:
    """Whether a listen address (host:port) binds loopback only; a unix socket counts as local."""
    import ipaddress

    if is_unix(listen):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", a hostname or 0.0.0.0-like: may be reachable from elsewhere


def tls() -> Tls:
    return _tls


def channel_credentials() -> grpc.ChannelCredentials | None:
    return grpc.ssl_channel_credentials(root_certificates=_tls.root_certs) if _tls.dials else None


def open_sync_channel(target: str) -> grpc.Channel:
    """A blocking channel (the SDK) with our options, TLS when configured."""
    creds = channel_credentials()
    if creds is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)


def status_code(exc: AitbcError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


# The reverse of status_code, for clients: each status name (every one but OK) -> its class.
STATUS_ERRORS: dict[str, type[AitbcError]] = {
    cls.code: cls
    for cls in (
        errors.Cancelled, errors.Unknown, errors.InvalidArgument, errors.DeadlineExceeded, errors.NotFound,
        errors.AlreadyExists, errors.PermissionDenied, errors.ResourceExhausted, errors.FailedPrecondition,
        errors.Aborted, errors.OutOfRange, errors.Unimplemented, errors.Internal, errors.Unavailable,
        errors.DataLoss, errors.Unauthenticated,
    )
}
RETRY_AFTER_MS = "retry-after-ms"  # trailing metadata of a RESOURCE_EXHAUSTED answer (see abort)
STATUS_DETAILS = "grpc-status-details-bin"  # a google.rpc.Status with its details (grpcio-status)


def error_from_code(code: str, message: str, *, retry_after_s: float | None = None, field: str = "") -> AitbcError:
    """The AitbcError for a status name (a call's, or one a response carries, as
    BroadcastTransactions results do); a name that is no status gives Unknown."""
    cls = STATUS_ERRORS.get(code, errors.Unknown)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, retry_after_s)
    if cls is InvalidArgument:
        return InvalidArgument(message, field)
    return cls(message)


def error_from_rpc(exc: grpc.RpcError) -> AitbcError:
    """What a failed call (sync or grpc.aio) raised on the server, rebuilt on the client: the
    AitbcError subclass whose `code` is the call's status, with the server's message (the status
    name when it sent none); for RESOURCE_EXHAUSTED `retry_after_s`, the delay the server asked
    for (retry_delay_s); for INVALID_ARGUMENT `field`, the request field its google.rpc.BadRequest
    names ("" when none: field_violations has them all). Use it as
    `raise error_from_rpc(exc) from None`."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    message = (exc.details() if callable(getattr(exc, "details", None)) else None) or name
    retry = retry_delay_s(exc) if name == ResourceExhausted.code else None
    field = next(iter(field_violations(exc)), ("", ""))[0] if name == InvalidArgument.code else ""
    return error_from_code(name, message, retry_after_s=retry, field=field)


def _status_details(exc: grpc.RpcError) -> list[Any]:
    """The google.rpc.Status details (Any messages) a failed call carries; [] when none or unreadable."""
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, TypeError, ValueError, DecodeError):
        status = None
    return list(status.details) if status is not None else []


def field_violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """[(field, description)] of the google.rpc.BadRequest detail of a failed call's status."""
    from google.rpc import error_details_pb2

    out = []
    for detail in _status_details(exc):
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR) and detail.Unpack(bad):
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def retry_delay_s(exc: grpc.RpcError) -> float | None:
    """How long the server asked the client to wait before trying again: the google.rpc.RetryInfo
    detail of the call's status, else (RESOURCE_EXHAUSTED) the retry-after-ms trailer; None when
    the server said nothing (or something unreadable)."""
    from google.rpc import error_details_pb2

    for detail in _status_details(exc):
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return delay if delay >= 0 else None
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return _retry_after_s(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None


def _retry_after_s(exc: grpc.RpcError) -> float | None:
    try:
        value = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_MS)
        ms = int(value) if value is not None else -1
    except (AttributeError, TypeError, ValueError):
        return None
    return ms / 1000 if ms >= 0 else None


# grpc-message travels as metadata (8 KiB soft limit), percent-encoded: every byte outside printable
# ASCII (and '%') takes 3, so one non-ASCII character can take 12. Never echo huge input.
MAX_DETAILS_BYTES = 2000
_TRUNCATED = "... (truncated)"


def _wire_len(ch: str) -> int:
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in ch.encode("utf-8", "replace"))


def details(message: str) -> str:
    """`message` cut so that its percent-encoded form stays within MAX_DETAILS_BYTES."""
    if len(message) * 12 <= MAX_DETAILS_BYTES:  # fast path: fits whatever the characters are
        return message
    budget = MAX_DETAILS_BYTES - len(_TRUNCATED)
    used = 0
    for i, ch in enumerate(message):
        used += _wire_len(ch)
        if used > budget:
            return message[:i] + _TRUNCATED
    return message


def status_with_details(code: grpc.StatusCode, message: str, details: Sequence[Any]) -> bytes:
    """A google.rpc.Status (serialised, for grpc-status-details-bin) carrying `details` (google.rpc
    messages such as RetryInfo or BadRequest), the convention grpcio-status clients read."""
    from google.protobuf import any_pb2
    from google.rpc import status_pb2

    packed = []
    for d in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(d)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed).SerializeToString()


def retry_ms(retry_after_s: float) -> int:
    """A retry delay in whole milliseconds, rounded up: a wait under a millisecond is 1 ms, never 0
    (0 would tell the client to retry at once, before the bucket has the token it lacked)."""
    return max(0, math.ceil(retry_after_s * 1000))


def retry_status(code: grpc.StatusCode, message: str, retry_after_s: float) -> bytes:
    """A google.rpc.Status whose RetryInfo detail says when to try again: the convention clients
    (the SDK's retry policy among them) read."""
    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2

    ms = retry_ms(retry_after_s)
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=ms // 1000,
                                                                          nanos=ms % 1000 * 1_000_000))
    return status_with_details(code, message, [info])


def bad_request_status(code: grpc.StatusCode, message: str, field: str) -> bytes:
    """A google.rpc.Status whose BadRequest detail names the request field at fault (the
    violation's description is the message itself)."""
    from google.rpc import error_details_pb2

    # the description repeats the message, cut: the whole status travels in the same 8 KiB of metadata
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message[:500])
    return status_with_details(code, message, [error_details_pb2.BadRequest(field_violations=[violation])])


async def abort(context: grpc.aio.ServicerContext, exc: AitbcError) -> None:
    """End the call with `exc`'s status and message (cut to fit the metadata budget), plus google.rpc
    details where they help: RetryInfo for a rate limit (and the older retry-after-ms trailer for
    clients that read that), BadRequest for an InvalidArgument that names its field."""
    message = details(exc.message)
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        context.set_trailing_metadata((
            (RETRY_AFTER_MS, str(retry_ms(exc.retry_after_s))),
            (STATUS_DETAILS, retry_status(status_code(exc), message, exc.retry_after_s)),
        ))
    elif isinstance(exc, InvalidArgument) and exc.field:
        context.set_trailing_metadata(((STATUS_DETAILS, bad_request_status(status_code(exc), message, exc.field)),))
    await context.abort(status_code(exc), message)


def translated(servicer: Any, exc: Exception) -> AitbcError | None:
    """An error other than AitbcError that the servicer names (its `translate_error`: a coordinator's
    lost database is Unavailable), or None: it stays what it is (UNKNOWN, logged by grpc)."""
    translate = getattr(servicer, "translate_error", None)
    return translate(exc) if translate is not None else None


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn AitbcError raised by a servicer method (unary or streaming) into its gRPC status, and
    what the servicer's `translate_error` maps (`translated`) as well."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except AitbcError as exc:
                await abort(context, exc)
            except Exception as exc:
                if (mapped := translated(self, exc)) is None:
                    raise
                await abort(context, mapped)

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except AitbcError as exc:
            await abort(context, exc)
        except Exception as exc:
            if (mapped := translated(self, exc)) is None:
                raise
            await abort(context, mapped)

    return unary_wrapper


class RequireCredential(grpc.aio.ServerInterceptor):
    """One credential check in front of every method of a server: `check(metadata)` raises an
    AitbcError (Unauthenticated) for a call that may not proceed, and the call ends with that status
    before its handler runs or its request is read. Services named in `open_services` (e.g. Health,
    for liveness probes) skip the check; everything else, including methods added later, is checked."""

    def __init__(self, check: Callable[[Any], None], *, open_services: Sequence[str] = ()) -> None:
        self._check = check
        self._open = tuple(f"/{name}/" for name in open_services)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        try:
            self._check(details.invocation_metadata)
        except AitbcError as exc:
            return _refusal(handler, exc)
        return handler


def _refusal(handler: Any, exc: AitbcError) -> Any:
    """A handler of the same kind as `handler` that only ends the call with `exc`'s status."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, exc)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, exc)
        yield  # pragma: no cover (abort raises)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class _MetadataBase:
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._md = tuple(metadata)

    def _details(self, d: Any) -> Any:
        md = grpc.aio.Metadata(*(tuple(d.metadata or ()) + self._md))
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


# grpc.aio files each interceptor under its first matching kind only: one class per kind
class _UnaryUnaryMetadata(_MetadataBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
        return await continuation(self._details(d), request)


class _UnaryStreamMetadata(_MetadataBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
        return await continuation(self._details(d), request)


class _StreamUnaryMetadata(_MetadataBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, d: Any, requests: Any) -> Any:
        return await continuation(self._details(d), requests)


class _StreamStreamMetadata(_MetadataBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, d: Any, requests: Any) -> Any:
        return await continuation(self._details(d), requests)


class _AddSyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The same for a blocking channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._md = tuple(metadata)

    def _details(self, d: Any) -> Any:
        return _SyncDetails(d.method, d.timeout, tuple(d.metadata or ()) + self._md, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation: Any, d: Any, requests: Any) -> Any:
        return continuation(self._details(d), requests)

    def intercept_stream_stream(self, continuation: Any, d: Any, requests: Any) -> Any:
        return continuation(self._details(d), requests)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def metadata_interceptors(metadata: Sequence[tuple[str, str]]) -> list[Any]:
    """Client interceptors for `channel(target, interceptors=...)` sending `metadata` on every call."""
    return [cls(metadata) for cls in (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata,
                                      _StreamStreamMetadata)]


def open_sync_channel_with(target: str, metadata: Sequence[tuple[str, str]]) -> grpc.Channel:
    """open_sync_channel whose every call carries `metadata` (a credential)."""
    return grpc.intercept_channel(open_sync_channel(target), _AddSyncMetadata(metadata))


@dataclass
class Service:
    """One servicer to mount: the generated add_*_to_server function and the full service name."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    names: list[str] = field(default_factory=list)

    async def set_serving(self, name: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(name, status)

    async def stop(self, grace: float | None = 2.0) -> None:
        for name in ["", *self.names]:
            await self.set_serving(name, False)
        await self.server.stop(grace)


class _Malformed:
    """Stands in for a request whose bytes are not the expected protobuf message."""

    def __init__(self, full_name: str) -> None:
        self.message = f"request body is not a valid {full_name} protobuf message"


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return _Malformed(cls.DESCRIPTOR.full_name)

    return deserialize


async def _checked(requests: Any) -> Any:
    async for msg in requests:
        if isinstance(msg, _Malformed):
            raise InvalidArgument(msg.message)
        yield msg


def _handler(fn: Callable[..., Any], client_streaming: bool, server_streaming: bool) -> Callable[..., Any]:
    """Wrap a servicer method so an undecodable request ends the call with INVALID_ARGUMENT (the
    generated handlers let grpcio answer UNKNOWN); in request streams the error ends the stream."""

    async def first(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if client_streaming:
            return fn(_checked(request), context)
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return fn(request, context)

    if server_streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            result = await first(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        result = await first(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def add_service(server: grpc.aio.Server, servicer: Any, service: Any) -> None:
    """Mount a servicer for a service descriptor, like the generated add_*_to_server functions but
    with malformed requests answered INVALID_ARGUMENT."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        req = message_factory.GetMessageClass(method.input_type)
        resp = message_factory.GetMessageClass(method.output_type)
        streaming = (method.client_streaming, method.server_streaming)
        handlers[method.name] = kinds[streaming](
            _handler(getattr(servicer, method.name), *streaming),
            request_deserializer=_lenient(req), response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


async def start_server(
    listen: str, services: Sequence[Service], *, interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> RunningServer:
    """Bind a grpc.aio server with health (per service) and reflection; `listen` may use port 0.
    The telemetry interceptor (trace propagation, aitbc_rpc_* metrics) comes first when tracing or
    metrics were configured before this call; with both off the server has no interceptor at all.
    `options`: channel arguments added to SERVER_OPTIONS (UPLOAD_SERVER_OPTIONS for untrusted uploads)."""
    chain = [*telemetry.server_interceptors(), *interceptors]
    server = grpc.aio.server(options=[*SERVER_OPTIONS, *options], interceptors=chain or None)
    pool = descriptor_pool.Default()
    for svc in services:
        try:
            add_service(server, svc.servicer, pool.FindServiceByName(svc.name))
        except KeyError:  # a service without a registered descriptor: its own add function
            svc.add(svc.servicer, server)
    health_servicer = health.aio.HealthServicer()
    add_service(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    names = [svc.name for svc in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    refuse_plaintext(listen)
    if _tls.serves:
        port = server.add_secure_port(listen, grpc.ssl_server_credentials([(_tls.private_key, _tls.cert_chain)]))
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or invalid")
    await server.start()
    running = RunningServer(server, port, health_servicer, names)
    for name in ["", *names]:
        await running.set_serving(name, True)
    return running


def caller_host(context: grpc.aio.ServicerContext) -> str:
    """The calling host of an RPC, without its port ("127.0.0.1", "::1", "unix" for a unix socket):
    what per-caller limits key on."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return kind or "unknown"


def port_in_use(listen: str) -> bool:
    """True when something already listens on host:port (a bind test, closed at once); port 0 and
    unix sockets are never busy."""
    if is_unix(listen):
        return False
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return True
    return False


def host_of(listen: str) -> str:
    host = listen.rsplit(":", 1)[0]
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host


def channel(target: str, *, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """An aio channel with our options, TLS when configured; the reads of RETRIED_READS are retried
    on UNAVAILABLE by grpc (SERVICE_CONFIG); it sends the trace context when tracing is on."""
    chain = [*telemetry.client_interceptors(), *interceptors]
    creds = channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=AIO_CHANNEL_OPTIONS, interceptors=chain or None)
    return grpc.aio.secure_channel(target, creds, options=AIO_CHANNEL_OPTIONS, interceptors=chain or None)
