-- The coordinator's JobStore on PostgreSQL (aitbc/coordinator/pgstore.py), version 1.
-- Values are the same deterministic protobuf bytes the LMDB store keeps; the columns beside them
-- are what SQL looks up by. Text keys sort as bytes (COLLATE "C"), as LMDB keys do.

CREATE TABLE jobs (
    job_id  text COLLATE "C" PRIMARY KEY,
    active  boolean NOT NULL,          -- QUEUED, ASSIGNED or RUNNING (restored at start)
    body    bytea NOT NULL             -- aitbc.v1.Job without its receipt
);
CREATE INDEX jobs_active ON jobs (job_id) WHERE active;

CREATE TABLE requests (                -- idempotent SubmitJob: (client, request_id) -> job
    client_id   text COLLATE "C" NOT NULL,
    request_id  text COLLATE "C" NOT NULL,
    job_id      text COLLATE "C" NOT NULL,
    PRIMARY KEY (client_id, request_id)
);

CREATE TABLE artifacts (               -- the record that an artifact is stored, and its expiry
    sha256         text COLLATE "C" PRIMARY KEY,
    size           bigint NOT NULL,
    chunk_bytes    integer NOT NULL,   -- every chunk but the last holds this many bytes
    expires_at_ms  bigint NOT NULL,    -- 0: kept for good
    job_id         text COLLATE "C" NOT NULL  -- the job whose expiry it is
);
CREATE INDEX artifacts_expiry ON artifacts (expires_at_ms, sha256) WHERE expires_at_ms <> 0;

CREATE TABLE artifact_chunks (         -- the bytes, one row per chunk: streamed in and out
    sha256  text COLLATE "C" NOT NULL REFERENCES artifacts (sha256) ON DELETE CASCADE,
    n       integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (sha256, n)
);
-- PNGs and most outputs are compressed already: store out of line without trying to compress
ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE receipts (
    receipt_hash  text COLLATE "C" PRIMARY KEY,
    held          boolean NOT NULL,    -- HELD: its MINT waits for a verification
    unsettled     boolean NOT NULL,    -- PENDING, SUBMITTED or INCLUDED
    body          bytea NOT NULL       -- aitbc.v1.Receipt
);
CREATE INDEX receipts_held ON receipts (receipt_hash) WHERE held;
CREATE INDEX receipts_unsettled ON receipts (receipt_hash) WHERE unsettled;

CREATE TABLE client_receipts (         -- a client's receipts newest first (ListReceipts pages)
    key           bytea PRIMARY KEY,   -- client_id 0x00 finished_ms (8 bytes, big-endian) job_id: the page token
    client_id     text COLLATE "C" NOT NULL,
    receipt_hash  text COLLATE "C" NOT NULL
);
CREATE INDEX client_receipts_by_client ON client_receipts (client_id, key);

CREATE TABLE meta (                    -- small values: secrets, the model registry, outboxes
    key    text COLLATE "C" PRIMARY KEY,
    value  bytea NOT NULL
);

CREATE TABLE reputation (              -- hub.reputation.MinerRecord as its JSON bytes
    miner_id  text COLLATE "C" PRIMARY KEY,
    record    bytea NOT NULL
);
