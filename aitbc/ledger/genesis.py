"""Genesis: the parameters a chain starts from (no balances: nothing is pre-minted).

The genesis hash is sha256 of the canonical JSON (minified, keys sorted, ASCII); it is the parent
hash of block 1 and the chain's identity: every transaction and block header carries it (so what
was signed for one network never validates on another with the same chain id), and a node refuses
a data folder made from any other genesis (docs/ledger.md, "Genesis").
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aitbc import crypto, strict_json
from aitbc.errors import CryptoError, InvalidArgument

GENESIS_VERSION = 3  # what make_genesis writes: version 2 plus the economy parameters (docs/economy.md)
GENESIS_VERSIONS = (2, 3)  # version 2 still loads, byte for byte, and has no economy
MAX_U64 = 2**64 - 1
MAX_EXACT = 2**53 - 1  # what every JSON reader (an IEEE double) reads exactly
# The integer fields' bounds (docs/ledger.md, "Genesis"): (least, most, why the most)
INTEGER_BOUNDS = {
    "block_time_ms": (50, 3_600_000, "50 ms to 1 hour"),
    "max_price_per_unit": (0, MAX_EXACT, "a receipt's price_per_unit is at most 2^53-1"),
    "max_mint_per_receipt": (1, MAX_U64, "amounts are u64; 0 would make every MINT mint nothing"),
    "genesis_time_ms": (0, MAX_EXACT, "Unix milliseconds"),
    "max_block_txs": (1, 2**32 - 1, "a block header's tx_count is a u32"),
}
PPM = 1_000_000  # parts per million: the slash fractions are integers, never floats
# Version 3 only: the economy (docs/economy.md); (least, most, why) as above, and the default
ECONOMY_BOUNDS = {
    "min_stake": (0, MAX_EXACT, "the stake a miner needs to be given work"),
    "unbonding_blocks": (1, 2**32 - 1, "blocks before unstaked tokens can be withdrawn"),
    "slash_ppm": (0, PPM, "parts per million of a convicted miner's stake that is cut"),
    "slash_reward_ppm": (0, PPM, "parts per million of the cut paid to the honest providers"),
    "escrow_timeout_blocks": (1, 2**32 - 1, "blocks before withdrawn escrow can be reclaimed"),
    # not the economy, but version 3 too: the authority set may change at each epoch boundary
    "epoch_blocks": (1, 2**32 - 1, "blocks per epoch: the authority set can change once per epoch"),
}
ECONOMY_DEFAULTS = {"min_stake": 0, "unbonding_blocks": 100, "slash_ppm": 500_000, "slash_reward_ppm": 500_000,
                    "escrow_timeout_blocks": 600, "epoch_blocks": 256}
ECONOMY_DISABLED = (
    "economy disabled: this chain's genesis is version 2, which has no stake, escrow or fee parameters; start a "
    "chain from a version 3 genesis (aitbc chain init)")
_V2_FIELDS = frozenset({"version", "chain_id", "authorities", "attesters", "block_time_ms", "max_price_per_unit",
                        "max_mint_per_receipt", "genesis_time_ms", "max_block_txs"})
_FIELDS = {2: _V2_FIELDS, 3: _V2_FIELDS | ECONOMY_BOUNDS.keys()}
CHAIN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
FORMAT_1_REFUSED = (
    "ledger format 1 did not bind signatures to the genesis hash and cannot be migrated (its blocks and "
    "transactions would need new signatures from every key): write a new genesis with `aitbc chain init` "
    "and start the nodes on new data folders")
FORMAT_2_REFUSED = (
    "ledger format 3 made the block's tx root a Merkle tree (receipt proofs), which changes every block "
    "hash, and a format 2 chain cannot be migrated (every block would need a new signature from its "
    "proposer): keep the genesis file and start the nodes on new data folders (move the old ones away)")
FORMAT_4_REFUSED = (
    "ledger format 5 headers commit to the authority sets (receipt proofs across set changes), which "
    "changes every block hash, and a format 4 chain cannot be migrated (every block would need a new "
    "signature from its proposer and every certificate new ones from its voters): stop every node of the "
    "network, upgrade them all, keep the genesis file and start them on new data folders (move the old "
    "ones away)")
FORMAT_3_REFUSED = (
    "ledger format 4 votes on two checkpoints per block (finality within the block's own slot), so its "
    "votes, certificates and vote lock are version 2, and a format 3 folder's certificates cannot be "
    "migrated (each would need new signatures from its voters): stop every node of the network, upgrade "
    "them all, keep the genesis file and start them on new data folders (move the old ones away)")


class ChainRef(NamedTuple):
    """What a signature binds: the chain id (readable) and the genesis hash (the chain's identity)."""

    chain_id: str
    genesis_hash: bytes


def check_chain_id(chain_id: str) -> None:
    if not isinstance(chain_id, str) or not CHAIN_ID_RE.match(chain_id):
        raise InvalidArgument(
            f"invalid chain id {chain_id!r}: 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit"
        )


@dataclass(frozen=True, slots=True)
class Genesis:
    chain_id: str
    authorities: tuple[str, ...]  # round-robin order: authorities[slot % n] proposes in slot
    attesters: tuple[str, ...]  # receipt attesters whose MINTs the chain accepts (sorted)
    block_time_ms: int
    max_price_per_unit: int  # a receipt's price per unit is capped at this when minting
    max_mint_per_receipt: int  # and the minted amount at this
    genesis_time_ms: int
    max_block_txs: int = 20_000
    # version 3: the economy (a version 2 genesis keeps the defaults and has no economy)
    min_stake: int = ECONOMY_DEFAULTS["min_stake"]
    unbonding_blocks: int = ECONOMY_DEFAULTS["unbonding_blocks"]
    slash_ppm: int = ECONOMY_DEFAULTS["slash_ppm"]
    slash_reward_ppm: int = ECONOMY_DEFAULTS["slash_reward_ppm"]
    escrow_timeout_blocks: int = ECONOMY_DEFAULTS["escrow_timeout_blocks"]
    version: int = GENESIS_VERSION
    # version 3: blocks per epoch; the authority set of each epoch comes from the state
    # (aitbc.ledger.authorities); a version 2 genesis keeps its list for good
    epoch_blocks: int = ECONOMY_DEFAULTS["epoch_blocks"]

    @property
    def has_economy(self) -> bool:
        """Stake, escrow, SETTLE and SLASH exist (version 3); a version 2 chain refuses them."""
        return self.version >= 3

    @property
    def has_authority_votes(self) -> bool:
        """The authorities may change the set by AUTHORITY_VOTE (version 3); version 2 keeps the list."""
        return self.version >= 3

    def epoch(self, height: int) -> int:
        """The epoch of block `height` (>= 1): (height - 1) // epoch_blocks; the genesis counts as epoch 0."""
        return max(0, height - 1) // self.epoch_blocks

    def validate(self) -> None:
        check_chain_id(self.chain_id)
        if self.version not in GENESIS_VERSIONS:
            if self.version == 1:
                raise InvalidArgument(f"genesis version 1 is not supported: {FORMAT_1_REFUSED}")
            raise InvalidArgument(f"genesis version {self.version} is not supported")
        if not self.authorities:
            raise InvalidArgument("genesis needs at least one authority")
        if len(set(self.authorities)) != len(self.authorities):
            raise InvalidArgument("genesis authorities must be distinct")
        if list(self.attesters) != sorted(set(self.attesters)):
            raise InvalidArgument("genesis attesters must be distinct and sorted")
        for who in (*self.authorities, *self.attesters):
            try:
                crypto.validate_address(who)
            except CryptoError as exc:
                raise InvalidArgument(f"genesis: {exc.message}") from None
        for name, (least, most, why) in INTEGER_BOUNDS.items():
            value = getattr(self, name)
            if type(value) is not int or not least <= value <= most:
                raise InvalidArgument(f"genesis {name} must be an integer in [{least}, {_power(most)}] ({why}), "
                                      f"got {value!r}")
        for name, (least, most, why) in ECONOMY_BOUNDS.items():
            value = getattr(self, name)
            if not self.has_economy:
                if value != ECONOMY_DEFAULTS[name]:  # its hash would not cover the value: refuse it
                    if name == "epoch_blocks":
                        raise InvalidArgument("genesis version 2 has no epoch_blocks (authority votes need version 3)")
                    raise InvalidArgument(f"genesis version 2 has no {name} (the economy needs version 3)")
            elif type(value) is not int or not least <= value <= most:
                raise InvalidArgument(f"genesis {name} must be an integer in [{least}, {_power(most)}] ({why}), "
                                      f"got {value!r}")

    @property
    def ref(self) -> ChainRef:
        return ChainRef(self.chain_id, self.hash())

    @property
    def authority_ids(self) -> tuple[bytes, ...]:
        return _account_ids(self.authorities)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "chain_id": self.chain_id,
            "authorities": list(self.authorities),
            "attesters": list(self.attesters),
            "block_time_ms": self.block_time_ms,
            "max_price_per_unit": self.max_price_per_unit,
            "max_mint_per_receipt": self.max_mint_per_receipt,
            "genesis_time_ms": self.genesis_time_ms,
            "max_block_txs": self.max_block_txs,
        }
        if self.has_economy:
            d.update({name: getattr(self, name) for name in ECONOMY_BOUNDS})
        return d

    @classmethod
    def from_dict(cls, data: Any) -> Genesis:
        if not isinstance(data, dict):
            raise InvalidArgument("genesis must be a JSON object")
        if data.get("version") == 1:
            raise InvalidArgument(f"genesis version 1 is not supported: {FORMAT_1_REFUSED}")
        version = data.get("version")
        # another version's fields are refused by the checks below (missing/unknown, then validate)
        names = _FIELDS[version if type(version) is int and version in _FIELDS else GENESIS_VERSION]
        missing, extra = names - data.keys(), data.keys() - names
        if missing or extra:
            raise InvalidArgument(f"genesis fields: missing {sorted(missing)}, unknown {sorted(extra)}")
        if not isinstance(data["authorities"], list) or not isinstance(data["attesters"], list):
            raise InvalidArgument("genesis authorities and attesters must be lists of addresses")
        g = cls(
            chain_id=data["chain_id"],
            authorities=tuple(data["authorities"]),
            attesters=tuple(data["attesters"]),
            block_time_ms=data["block_time_ms"],
            max_price_per_unit=data["max_price_per_unit"],
            max_mint_per_receipt=data["max_mint_per_receipt"],
            genesis_time_ms=data["genesis_time_ms"],
            max_block_txs=data["max_block_txs"],
            version=data["version"],
            **{name: data[name] for name in ECONOMY_BOUNDS if name in names},
        )
        g.validate()
        return g

    def canonical_bytes(self) -> bytes:
        self.validate()
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def hash(self) -> bytes:
        return _genesis_hash(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Genesis:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read genesis {path}: {exc.strerror}") from None
        try:  # one file, one genesis hash for every reader: no duplicate keys, integers only, no BOM
            data = strict_json.loads(raw)
        except strict_json.StrictJSONError as exc:
            raise InvalidArgument(f"genesis {path} {exc}") from None
        return cls.from_dict(data)


def _power(n: int) -> str:
    return {MAX_U64: "2^64-1", MAX_EXACT: "2^53-1", 2**32 - 1: "2^32-1"}.get(n, f"{n:,}")


def unique_chain_id(prefix: str = "aitbc") -> str:
    """A chain id no other network shares by accident: `prefix-` and 8 random hex digits."""
    import secrets

    cid = f"{prefix}-{secrets.token_hex(4)}"
    check_chain_id(cid)
    return cid


@functools.lru_cache(maxsize=64)
def _account_ids(addresses: tuple[str, ...]) -> tuple[bytes, ...]:  # checked once per vote and block
    return tuple(crypto.validate_address(a) for a in addresses)


@functools.lru_cache(maxsize=64)
def _genesis_hash(g: Genesis) -> bytes:  # checked once per tx: compute it once per genesis
    return crypto.sha256(g.canonical_bytes())


def make_genesis(
    chain_id: str,
    authorities: list[str],
    attesters: list[str],
    *,
    block_time_ms: int = 1000,
    max_price_per_unit: int = 10**12,
    max_mint_per_receipt: int = 10**18,
    genesis_time_ms: int = 0,
    max_block_txs: int = 20_000,
    min_stake: int = ECONOMY_DEFAULTS["min_stake"],
    unbonding_blocks: int = ECONOMY_DEFAULTS["unbonding_blocks"],
    slash_ppm: int = ECONOMY_DEFAULTS["slash_ppm"],
    slash_reward_ppm: int = ECONOMY_DEFAULTS["slash_reward_ppm"],
    escrow_timeout_blocks: int = ECONOMY_DEFAULTS["escrow_timeout_blocks"],
    version: int = GENESIS_VERSION,
    epoch_blocks: int = ECONOMY_DEFAULTS["epoch_blocks"],
) -> Genesis:
    """A genesis (version 3 unless `version=2`: a chain without the economy, for old data folders
    and their vectors)."""
    g = Genesis(chain_id, tuple(authorities), tuple(sorted(set(attesters))), block_time_ms,
                max_price_per_unit, max_mint_per_receipt, genesis_time_ms, max_block_txs, min_stake,
                unbonding_blocks, slash_ppm, slash_reward_ppm, escrow_timeout_blocks, version, epoch_blocks)
    g.validate()
    return g
