"""Error details echo user input, and travel as percent-encoded gRPC metadata (8 KiB soft limit):
aitbc.rpc.details keeps the encoded size bounded whatever the characters (Hypothesis found a
1,000-character Thai address that encoded to 9 KB and turned INVALID_ARGUMENT into a transport error)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aitbc.rpc import MAX_DETAILS_BYTES, details


def wire_len(text: str) -> int:
    """Bytes of grpc-message on the wire: printable ASCII except '%' as is, other bytes as %XX."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8", "replace"))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=5000), st.integers(1, 4))
def test_details_stay_within_the_metadata_budget(text: str, repeat: int) -> None:
    message = f"address {text * repeat} is not a valid address"
    out = details(message)
    assert wire_len(out) <= MAX_DETAILS_BYTES
    if out != message:  # cut: a prefix of the message, and it says so
        assert out.endswith("... (truncated)") and message.startswith(out[: -len("... (truncated)")])


def test_the_cases_that_matter() -> None:
    short = "steps must be between 1 and 500, got 900"
    assert details(short) == short
    thai = "invalid address " + "กา" * 908  # what the ledger fuzz test sent to GetAccount
    assert wire_len(details(thai)) <= MAX_DETAILS_BYTES < wire_len(thai)
    ascii_long = "x" * 100_000
    out = details(ascii_long)
    assert out.startswith("x" * 1900) and wire_len(out) <= MAX_DETAILS_BYTES


# ---- google.rpc details on real calls: a BadRequest naming the field, beside the unchanged message ---


async def test_submit_job_names_the_bad_field_in_a_bad_request_detail(network_factory) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from aitbc import errors, jobs, rpc
    from aitbc.clients.sdk import ClientError, CoordinatorClient
    from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2
    from tests.conftest import API_KEY

    net = await network_factory()
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    md = (("x-api-key", API_KEY),)
    cases = [
        (coordinator_pb2.SubmitJobRequest(model="tiny-sd", params=job_pb2.JobParams(
            image=job_pb2.ImageParams(prompt="a red bicycle", steps=900))),
         "params.image.steps", f"steps must be between 1 and {jobs.MAX_STEPS} (got 900)"),
        (coordinator_pb2.SubmitJobRequest(model="tiny-llama", params=job_pb2.JobParams(
            text=job_pb2.TextParams(prompt="hi", top_p=2.0))),
         "params.text.top_p", "top_p must be in (0, 1] (got 2.0)"),
        (coordinator_pb2.SubmitJobRequest(model="", params=job_pb2.JobParams(
            image=job_pb2.ImageParams(prompt="x"))), "model", None),
        (coordinator_pb2.SubmitJobRequest(model="tiny-sd", params=job_pb2.JobParams(
            image=job_pb2.ImageParams(prompt="x")), request_id="no spaces allowed"), "request_id", None),
    ]
    for request, field, message in cases:
        try:
            await stub.SubmitJob(request, metadata=md)
        except grpc.aio.AioRpcError as exc:
            err = exc
        else:
            raise AssertionError(f"{field}: accepted")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        if message is not None:
            assert err.details() == message  # the human message is what it was
        status = rpc_status.from_call(err)  # grpcio-status parses the details
        assert status is not None and status.message == err.details()
        (detail,) = status.details
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        assert [(v.field, v.description) for v in bad.field_violations] == [(field, err.details())]
        back = rpc.error_from_rpc(err)
        assert type(back) is errors.InvalidArgument and back.field == field and back.message == err.details()
        assert rpc.field_violations(err) == [(field, err.details())]

    # GenerateImage's params are the ImageParams themselves; the SDK's error carries the field too
    gen = coordinator_pb2.GenerateImageRequest(model="tiny-sd", params=job_pb2.ImageParams(prompt="x", images=99))
    try:
        await stub.GenerateImage(gen, metadata=md)
    except grpc.aio.AioRpcError as exc:
        assert rpc.error_from_rpc(exc).field == "params.images"  # type: ignore[attr-defined]
    else:
        raise AssertionError("accepted")

    def sdk_call() -> ClientError:
        from aitbc.clients.retry import NO_RETRY

        with CoordinatorClient(net.address, API_KEY, retry=NO_RETRY) as client:
            try:
                client.submit("tiny-sd", job_pb2.JobParams(image=job_pb2.ImageParams(prompt="x", steps=900)))
            except ClientError as e:
                return e
        raise AssertionError("accepted")

    sdk_err = await asyncio.to_thread(sdk_call)
    assert isinstance(sdk_err, errors.InvalidArgument) and sdk_err.field == "params.image.steps"  # type: ignore[attr-defined]
    assert str(sdk_err) == f"INVALID_ARGUMENT: steps must be between 1 and {jobs.MAX_STEPS} (got 900)"


async def test_an_error_without_a_field_has_no_details(network_factory) -> None:  # type: ignore[no-untyped-def]
    import grpc
    from grpc_status import rpc_status

    from aitbc import rpc
    from aitbc.v1 import coordinator_pb2, coordinator_pb2_grpc
    from tests.conftest import API_KEY

    net = await network_factory()
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(net.channel())
    try:
        await stub.GetJob(coordinator_pb2.GetJobRequest(job_id="0" * 28), metadata=(("x-api-key", API_KEY),))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        assert rpc_status.from_call(exc) is None and rpc.field_violations(exc) == []
        assert not hasattr(rpc.error_from_rpc(exc), "field")
    else:
        raise AssertionError("found")


async def test_ledger_malformed_transaction_names_raw(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from aitbc import crypto, errors, rpc
    from aitbc.v1 import ledger_pb2, ledger_pb2_grpc
    from tests.coordinator.test_settlement import LedgerNode

    async with LedgerNode(tmp_path, crypto.PrivateKey.generate().address) as node:
        async with rpc.channel(node.address) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            for request, call, field in (
                (ledger_pb2.BroadcastTransactionRequest(raw=b"\x01not a transaction"), stub.BroadcastTransaction, "raw"),
                (ledger_pb2.GetAccountRequest(address="ait1xyz"), stub.GetAccount, "address"),
            ):
                try:
                    await call(request)
                except grpc.aio.AioRpcError as exc:
                    failed = exc
                else:
                    raise AssertionError(f"{field}: accepted")
                err = rpc.error_from_rpc(failed)
                assert isinstance(err, errors.InvalidArgument) and err.field == field, (field, err.message)
                assert rpc.field_violations(failed) == [(field, failed.details())]


def test_a_retry_delay_under_a_millisecond_is_sent_as_one_not_zero() -> None:
    # a bucket a fraction of a token short asks for a wait of microseconds: sent as 0 ms, the client
    # would retry at once and be refused again (the vote bucket's refusal said "retry in 0.0 s")
    from aitbc import rpc

    assert rpc.retry_ms(0.0004) == 1 and rpc.retry_ms(0.0) == 0 and rpc.retry_ms(1.2501) == 1251
