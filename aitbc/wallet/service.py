"""WalletCore: the wallet's behaviour, shared by the wallet daemon (server/wallet.py) and the
`aitbc wallet` commands (clients/wallet_cli.py).

It joins three things: a Keystore (encrypted files, docs/wallet.md), UnlockedWallets (keys held in
memory, locking themselves when idle; the only place that signs) and a LedgerClient (balances,
nonces, broadcasts). Nothing here knows about gRPC requests; errors are AitbcError subclasses that
aitbc.rpc maps to statuses at the server boundary and the CLI prints as `error: ...`.

Every check that needs no ledger runs before the ledger is asked anything, so bad input (amount,
address, unknown or locked wallet, sending to oneself) is refused with its own message even when
the ledger is down, and a refused request never reaches the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from aitbc import crypto, strict_json
from aitbc.errors import AitbcError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aitbc.ledger import tx as txmod
from aitbc.ledger.client import LedgerClient
from aitbc.ledger.genesis import ChainRef
from aitbc.receipts import SignedReceipt, verify_receipt
from aitbc.wallet.keystore import DEFAULT_KDF, INSECURE_FAST_KDF, KdfParams, Keystore, validate_name
from aitbc.wallet.throttle import Backoff
from aitbc.wallet.unlocked import DEFAULT_IDLE_TIMEOUT_S, UnlockedWallets

KDF_PROFILES: dict[str, KdfParams] = {"default": DEFAULT_KDF, "fast": INSECURE_FAST_KDF}
MAX_AMOUNT = txmod.MAX_U64
DEFAULT_WAIT_S = 30.0
_DECIMAL = re.compile(r"[0-9]+")
_KEY_HEX = re.compile(r"[0-9a-fA-F]{64}")


def kdf_for_profile(profile: str) -> KdfParams:
    """`default` for real wallets; `fast` (libsodium's minimum cost) only for tests and throwaways."""
    try:
        return KDF_PROFILES[profile]
    except KeyError:
        raise InvalidArgument(
            f"unknown kdf_profile {profile!r}: use one of {', '.join(sorted(KDF_PROFILES))}"
        ) from None


def parse_amount(value: Any) -> int:
    """An amount of smallest token units: a positive integer, or its decimal string (no sign, no
    point, no exponent: "1.5", "1e3" and "-1" are refused rather than rounded)."""
    shown = repr(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if not _DECIMAL.fullmatch(text):
            raise InvalidArgument(
                f"amount must be a whole number of token units written in decimal digits, got {value!r}"
            )
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"amount must be an integer number of token units, got {shown}")
    if value <= 0:
        raise InvalidArgument(f"amount must be at least 1 token unit, got {value}")
    if value > MAX_AMOUNT:
        raise InvalidArgument(f"amount must be at most 2^64-1 token units, got {value}")
    return value


def check_address(address: Any, what: str = "recipient") -> str:
    """A checksummed `ait1...` address, or InvalidArgument naming `what` and the defect
    (e.g. "recipient address 'ait1...': bad checksum")."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidArgument(f"{what} address is empty")
    address = address.strip()
    try:
        crypto.validate_address(address)
    except InvalidArgument as exc:
        detail = exc.message.split(": ", 1)[-1] if exc.message.startswith("invalid address") else exc.message
        raise InvalidArgument(f"{what} address {address!r} is not valid: {detail}") from None
    return address


@dataclass(frozen=True)
class WalletView:
    name: str
    address: str
    unlocked: bool = False


@dataclass(frozen=True)
class Balance:
    address: str
    balance: int
    nonce: int
    pending_nonce: int
    wallet: str = ""


@dataclass(frozen=True)
class SignedTransfer:
    raw: bytes
    tx_hash: str
    chain_id: str
    nonce: int
    from_address: str
    to: str
    amount: int


@dataclass(frozen=True)
class SendResult:
    tx_hash: str
    nonce: int
    from_address: str
    to: str
    amount: int
    included: bool = False
    block_height: int = 0
    block_hash: str = ""
    final: bool = False


@dataclass(frozen=True)
class ReceiptCheck:
    valid: bool
    error: str = ""
    receipt_hash: str = ""
    provider: str = ""
    attester: str = ""
    chain_id: str = ""
    amount: int = 0
    # "" when the ledger was not asked; else "not_minted", "pending", "included" or "final"
    mint_status: str = ""
    mint_tx_hash: str = ""
    mint_block_height: int = 0
    minted_amount: int = 0


_MINT_STATUS = {"unknown": "not_minted", "pending": "pending", "included": "included", "final": "final"}


class WalletCore:
    """Wallets of one keystore directory, signing through UnlockedWallets, talking to one ledger.

    `ledger` is a LedgerClient, a node address (the client is made on first use, inside the event
    loop) or None (then balance, send and ledger checks fail with FailedPrecondition). Create,
    import and unlock run the KDF (about 0.2 s with the default profile): async callers should run
    them in a thread.
    """

    def __init__(
        self,
        keystore: Keystore,
        ledger: LedgerClient | str | None = None,
        *,
        idle_lock_s: float = DEFAULT_IDLE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        wait_timeout_s: float = DEFAULT_WAIT_S,
        backoff: Backoff | None = None,
    ) -> None:
        self.keystore = keystore
        self.unlocked = UnlockedWallets(keystore, idle_timeout_s=idle_lock_s, clock=clock, backoff=backoff)
        self._ledger_target = ledger if isinstance(ledger, str) else None
        self._ledger = ledger if isinstance(ledger, LedgerClient) else None
        self._own_ledger = False
        self.wait_timeout_s = wait_timeout_s
        self._send_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, conf: Any, **kw: Any) -> WalletCore:
        """From an aitbc.config.WalletConfig (keystore_dir, ledger, idle_lock_s, kdf_profile,
        unlock_backoff_base_s, unlock_backoff_max_s)."""
        ks = Keystore(conf.keystore_dir, kdf=kdf_for_profile(conf.kdf_profile))
        backoff = Backoff(base_s=conf.unlock_backoff_base_s, max_s=conf.unlock_backoff_max_s,
                          forget_after_s=max(Backoff.forget_after_s, conf.unlock_backoff_max_s))
        return cls(ks, conf.ledger or None, idle_lock_s=conf.idle_lock_s, backoff=backoff, **kw)

    async def close(self) -> None:
        self.unlocked.lock_all()
        if self._ledger is not None and self._own_ledger:
            await self._ledger.close()
            self._ledger = None

    @property
    def ledger(self) -> LedgerClient:
        if self._ledger is None:
            if not self._ledger_target:
                raise FailedPrecondition("no ledger node is configured for this wallet (set `ledger`)")
            self._ledger = LedgerClient(self._ledger_target)
            self._own_ledger = True
        return self._ledger

    @contextlib.contextmanager
    def _reaching_ledger(self) -> Iterator[None]:
        """Say which node could not be reached, not only gRPC's transport error."""
        try:
            yield
        except Unavailable as exc:
            where = self._ledger_target or "the ledger node"
            raise Unavailable(f"cannot reach the ledger node at {where}: {exc.message}") from None

    # -- keystore ---------------------------------------------------------------------------

    def _view(self, name: str, address: str) -> WalletView:
        return WalletView(name, address, self.unlocked.is_unlocked(name))

    def create(self, name: str, passphrase: Any) -> WalletView:
        return self._view(name, self.keystore.create(name, passphrase))

    def import_key(self, name: str, key_hex: str, passphrase: Any) -> WalletView:
        """A wallet for a hex private key (64 hex characters, optional 0x)."""
        if not isinstance(key_hex, str) or not key_hex.strip():
            raise InvalidArgument("private key must be 64 hex characters, got nothing")
        text = key_hex.strip().removeprefix("0x")
        if not _KEY_HEX.fullmatch(text):  # the message never echoes what might be a real key
            got = f"got {len(text)} characters" if len(text) != 64 else "got other characters"
            raise InvalidArgument(f"private key must be 64 hex characters (32 bytes), {got}")
        validate_name(name)
        return self._view(name, self.keystore.import_key(name, key_hex, passphrase))

    def import_keystore(self, name: str | None, document: str | bytes | dict[str, Any], passphrase: Any = None,
                        *, label: str | None = None) -> WalletView:
        """An exported keystore document: its JSON text, bytes or the parsed object, never a path
        (text that is not a JSON object is refused without any filesystem lookup). `name` None
        keeps the name in the document; with a passphrase it is decrypted first. `label` names the
        source in messages (the CLI passes the file it read)."""
        address = self.keystore.import_file(name or None, document, passphrase or None, label=label)
        stored = name or self._name_of(address)
        return self._view(stored, address)

    def _name_of(self, address: str) -> str:
        for w in self.keystore.list():
            if w.address == address:
                return w.name
        raise NotFound(f"no wallet holds {address}")

    def list(self) -> list[WalletView]:
        return [self._view(w.name, w.address) for w in self.keystore.list()]

    def info(self, name: str) -> WalletView:
        return self._view(name, self.keystore.info(name).address)

    def export(self, name: str) -> str:
        return self.keystore.export(name)

    def unlock(self, name: str, passphrase: Any, timeout_s: float | None = None) -> WalletView:
        address = self.unlocked.unlock(name, passphrase, timeout_s=timeout_s)
        return WalletView(name, address, True)

    def lock(self, name: str) -> bool:
        """Drop the key from memory now; True when it was unlocked."""
        was = self.unlocked.lock(validate_name(name))
        if not was and not self.keystore.exists(name):
            raise NotFound(f"wallet '{name}' does not exist")
        return was

    # -- ledger -----------------------------------------------------------------------------

    def resolve(self, name_or_address: str) -> tuple[str, str]:
        """(wallet name or "", address) for a wallet name or an `ait1...` address. A wallet of
        that name wins; text that is neither is NOT_FOUND (or INVALID_ARGUMENT for a broken
        address)."""
        text = (name_or_address or "").strip()
        if not text:
            raise InvalidArgument("give a wallet name or an address")
        try:
            if self.keystore.exists(validate_name(text)):
                return text, self.keystore.info(text).address
        except InvalidArgument:
            pass  # not a possible wallet name; maybe an address
        if text.lower().startswith("ait1"):
            return "", check_address(text, "account")
        raise NotFound(f"wallet '{text}' does not exist (and it is not an ait1... address)")

    async def balance(self, name_or_address: str) -> Balance:
        name, address = self.resolve(name_or_address)
        return await self._balance(address, name)

    async def wallet_balance(self, name: str) -> Balance:
        return await self._balance(self.keystore.info(name).address, name)

    async def address_balance(self, address: str) -> Balance:
        return await self._balance(check_address(address, "account"), "")

    async def _balance(self, address: str, name: str) -> Balance:
        with self._reaching_ledger():
            acct = await self.ledger.get_account(address)
        return Balance(address, acct.balance, acct.nonce, acct.pending_nonce, name)

    def _check_transfer(self, wallet: str, to: Any, amount: Any) -> tuple[bytes, str, int]:
        """Everything a transfer needs that the ledger cannot say: (sender pubkey, to, amount)."""
        amount = parse_amount(amount)
        to = check_address(to)
        parsed = self.keystore.file(wallet)  # NotFound, or a damaged file named
        if parsed.address == to:
            raise InvalidArgument("cannot send to the sending wallet's own address")
        if not self.unlocked.is_unlocked(wallet):
            raise FailedPrecondition(f"wallet '{wallet}' is locked: unlock it first")
        return parsed.pubkey, to, amount

    def _sign(self, wallet: str, chain: ChainRef, pubkey: bytes, nonce: int, to: str, amount: int) -> SignedTransfer:
        body = txmod.encode_transfer_body(chain, pubkey, nonce, to, amount)
        raw = txmod.attach_signature(body, self.unlocked.sign(wallet, txmod.signing_digest(body)))
        return SignedTransfer(raw, crypto.sha256(raw).hex(), chain.chain_id, nonce,
                              crypto.address_from_pubkey(pubkey), to, amount)

    async def sign_transfer(self, wallet: str, to: Any, amount: Any, *, nonce: int | None = None,
                            chain_id: str | None = None, genesis_hash: str | None = None) -> SignedTransfer:
        """A signed TRANSFER, not broadcast. Nonce, chain id and genesis hash (hex; a transaction
        binds both) come from the ledger unless given (with all three given no ledger is needed)."""
        pubkey, to, amount = self._check_transfer(wallet, to, amount)
        if nonce is not None and (isinstance(nonce, bool) or not isinstance(nonce, int) or not 0 <= nonce <= MAX_AMOUNT):
            raise InvalidArgument(f"nonce must be an integer in [0, 2^64-1], got {nonce!r}")
        if bool(chain_id) != bool(genesis_hash):
            raise InvalidArgument("give chain_id and genesis_hash together (a transaction binds both), or neither "
                                  "to use the ledger's")
        chain = None
        if chain_id and genesis_hash:
            try:
                gh = bytes.fromhex(genesis_hash)
            except ValueError:
                gh = b""
            if len(gh) != 32:
                raise InvalidArgument("genesis_hash must be 64 hex characters")
            chain = ChainRef(chain_id, gh)
        with self._reaching_ledger():
            chain = chain or await self.ledger.chain_ref()
            n = nonce if nonce is not None else await self.ledger.next_nonce(crypto.address_from_pubkey(pubkey))
        return self._sign(wallet, chain, pubkey, n, to, amount)

    async def send(self, wallet: str, to: Any, amount: Any, *, wait: bool = True, final: bool = False,
                   timeout_s: float | None = None) -> SendResult:
        """Sign a TRANSFER, broadcast it, and (wait) poll until it is in a block (final: a final
        one). The node refuses what the chain state forbids (e.g. "insufficient balance: ...")."""
        pubkey, to, amount = self._check_transfer(wallet, to, amount)
        lock = self._send_locks.setdefault(wallet, asyncio.Lock())
        async with lock:  # one nonce at a time per wallet
            ledger = self.ledger
            with self._reaching_ledger():
                chain = await ledger.chain_ref()
                nonce = await ledger.next_nonce(crypto.address_from_pubkey(pubkey))
            signed = self._sign(wallet, chain, pubkey, nonce, to, amount)
            with self._reaching_ledger():
                tx_hash = await ledger.broadcast(signed.raw)
        result = SendResult(tx_hash, signed.nonce, signed.from_address, to, amount)
        if not (wait or final):
            return result
        timeout = self.wait_timeout_s if timeout_s is None else timeout_s
        try:
            st = await ledger.wait_for_tx(tx_hash, final=final, timeout=timeout)
        except Unavailable as exc:
            raise Unavailable(
                f"tx {tx_hash} was broadcast but not seen in a{' final' if final else ''} block after "
                f"{timeout:g} s ({exc.message}); check it later with `aitbc chain tx {tx_hash}`"
            ) from None
        return SendResult(tx_hash, signed.nonce, signed.from_address, to, amount, True, st.block_height,
                          st.block_hash, st.status == "final")

    # -- the economy (genesis version 3: docs/economy.md) ---------------------------------------

    ECONOMY_OPS = {"stake": txmod.KIND_STAKE, "unstake": txmod.KIND_UNSTAKE, "withdraw": txmod.KIND_WITHDRAW,
                   "escrow_deposit": txmod.KIND_ESCROW_DEPOSIT, "escrow_withdraw": txmod.KIND_ESCROW_WITHDRAW,
                   "escrow_reclaim": txmod.KIND_ESCROW_RECLAIM}

    async def default_attester(self, attester: str | None) -> str:
        """`attester`, else the genesis's only attester; with several the error lists them."""
        if attester:
            return check_address(attester, "attester")
        with self._reaching_ledger():
            names = list((await self.ledger.get_genesis()).attesters)
        if len(names) != 1:
            raise InvalidArgument(f"this chain has {len(names)} attesters ({', '.join(names) or 'none'}): name one "
                                  "with --attester")
        return names[0]

    async def economy(self, wallet: str, op: str, *, amount: int = 0, attester: str = "", wait: bool = True,
                      final: bool = False, timeout_s: float | None = None) -> SendResult:
        """Sign and send STAKE, UNSTAKE, WITHDRAW or an escrow transaction from an unlocked wallet
        (as `send`), after the checks that give a clear next step; the node refuses the rest with
        its message ("still unbonding: ...")."""
        kind = self.ECONOMY_OPS[op]
        if kind in txmod.AMOUNT_KINDS:
            amount = parse_amount(amount)
        parsed = self.keystore.file(wallet)
        if not self.unlocked.is_unlocked(wallet):
            raise FailedPrecondition(f"wallet '{wallet}' is locked: unlock it first")
        ledger = self.ledger
        with self._reaching_ledger():
            acct = await ledger.get_account(parsed.address)
        if kind in txmod.SPEND_KINDS and acct.balance < amount:
            raise FailedPrecondition(f"balance {acct.balance} is less than {amount}: receive {amount - acct.balance} "
                                     "more first")
        if kind == txmod.KIND_UNSTAKE and acct.staked < amount:
            raise FailedPrecondition(f"staked {acct.staked} is less than {amount}: unstake at most {acct.staked}")
        if kind == txmod.KIND_WITHDRAW and acct.unbonding and acct.height + 1 < acct.unlock_height:
            raise FailedPrecondition(f"{acct.unbonding} still unbonding: it unlocks at height {acct.unlock_height} "
                                     f"(now {acct.height}); run `aitbc withdraw` again then")
        lock = self._send_locks.setdefault(wallet, asyncio.Lock())
        async with lock:
            with self._reaching_ledger():
                chain = await ledger.chain_ref()
                nonce = await ledger.next_nonce(parsed.address)
            body = txmod.encode_economy_body(kind, chain, parsed.pubkey, nonce, amount=amount, attester=attester)
            raw = txmod.attach_signature(body, self.unlocked.sign(wallet, txmod.signing_digest(body)))
            with self._reaching_ledger():
                tx_hash = await ledger.broadcast(raw)
        result = SendResult(tx_hash, nonce, parsed.address, attester, amount)
        if not (wait or final):
            return result
        st = await ledger.wait_for_tx(tx_hash, final=final,
                                      timeout=self.wait_timeout_s if timeout_s is None else timeout_s)
        return SendResult(tx_hash, nonce, parsed.address, attester, amount, True, st.block_height, st.block_hash,
                          st.status == "final")

    # -- receipts ---------------------------------------------------------------------------

    async def verify_receipt(self, document: str | bytes | dict[str, Any], *, check_ledger: bool = False,
                             attesters: Iterable[str] = (), require_attestation: bool = False) -> ReceiptCheck:
        """Check a receipt JSON document offline; with check_ledger also ask the ledger whether it
        was minted (a receipt hash mints at most once, ever) and for how much.

        A document that is not a JSON object is INVALID_ARGUMENT; a receipt that fails a check is
        a verdict (valid False, error saying why), not an exception."""
        if isinstance(document, dict):
            data: Any = document
        else:
            try:
                data = strict_json.loads(document)  # one file, one meaning (docs/receipts.md)
            except strict_json.StrictJSONError as exc:
                raise InvalidArgument(f"receipt file {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgument("receipt must be a JSON object")
        allowed = frozenset(check_address(a, "attester") for a in attesters) or None
        try:
            receipt = SignedReceipt.from_json_dict(data)
            body = receipt.body
            base = dict(receipt_hash=receipt.receipt_hash.hex(), provider=body.provider,
                        attester=receipt.attester, chain_id=body.chain_id,
                        amount=min(body.units * body.price_per_unit, MAX_AMOUNT))
        except AitbcError as exc:
            return ReceiptCheck(False, exc.message)
        except (TypeError, ValueError, AttributeError) as exc:  # field of the wrong JSON type
            return ReceiptCheck(False, f"malformed receipt: {exc}")
        try:
            verify_receipt(receipt, require_attestation=require_attestation, attesters=allowed)
        except AitbcError as exc:
            return ReceiptCheck(False, exc.message, **base)  # type: ignore[arg-type]
        if not check_ledger:
            return ReceiptCheck(True, **base)  # type: ignore[arg-type]
        ledger = self.ledger
        with self._reaching_ledger():
            chain = await ledger.chain_id()
        if body.chain_id != chain:
            return ReceiptCheck(False, f"receipt is for chain {body.chain_id!r}, but the ledger runs {chain!r}",
                                mint_status="not_minted", **base)  # type: ignore[arg-type]
        with self._reaching_ledger():
            st = await ledger.get_receipt_status(receipt.receipt_hash)
        return ReceiptCheck(True, mint_status=_MINT_STATUS.get(st.status, "not_minted"), mint_tx_hash=st.tx_hash,
                            mint_block_height=st.block_height, minted_amount=st.amount,
                            **base)  # type: ignore[arg-type]
