"""Conversion between wire messages (aitbc.v1) and domain types, validating on the way in."""

from __future__ import annotations

from aitbc.errors import ReceiptError
from aitbc.receipts import ReceiptBody, SignedReceipt, field_names
from aitbc.v1 import receipt_pb2


def receipt_body_to_proto(body: ReceiptBody) -> receipt_pb2.ReceiptBody:
    return receipt_pb2.ReceiptBody(**body.to_dict())


def receipt_body_from_proto(msg: receipt_pb2.ReceiptBody) -> ReceiptBody:
    return ReceiptBody.from_dict({name: getattr(msg, name) for name in field_names(msg.version)})


def receipt_to_proto(receipt: SignedReceipt) -> receipt_pb2.Receipt:
    return receipt_pb2.Receipt(
        body=receipt_body_to_proto(receipt.body),
        receipt_hash=receipt.receipt_hash.hex(),
        provider_signature=receipt.provider_signature,
        attester=receipt.attester,
        attester_signature=receipt.attester_signature,
    )


def receipt_from_proto(msg: receipt_pb2.Receipt) -> SignedReceipt:
    if not msg.HasField("body"):
        raise ReceiptError("receipt has no body")
    receipt = SignedReceipt(
        receipt_body_from_proto(msg.body), msg.provider_signature, msg.attester, msg.attester_signature
    )
    if msg.receipt_hash and msg.receipt_hash != receipt.receipt_hash.hex():
        raise ReceiptError("receipt_hash does not match the canonical hash of the body: a field was altered")
    return receipt
