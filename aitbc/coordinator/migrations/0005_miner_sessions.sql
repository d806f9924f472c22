-- Version 5: miner-session ownership and the pool-wide max_active_jobs (docs/scaling.md, issue 18).
-- A miner key is connected to one coordinator at a time: opening its Work stream upserts its row
-- here with a new epoch and NOTIFY aitbc_miners 'miner:epoch'; the previous owner ends its stream
-- on the notification, or at its next renewal (the row is not its own any more) at the latest. The
-- owner renews its miners' leases in one statement per heartbeat interval; a dead coordinator's
-- rows expire, and ListMiners shows the live rows: every miner of the pool and where it is.

CREATE TABLE miner_sessions (
    miner        text COLLATE "C" PRIMARY KEY,   -- the miner's address (ait1...)
    coordinator  text COLLATE "C" NOT NULL,      -- coordinators.id of the one its Work stream is on
    epoch        bigint NOT NULL,                -- nextval at each connection: the newest one wins
    lease_until  timestamptz NOT NULL,           -- renewed every heartbeat interval by the owner
    info         bytea NOT NULL,                 -- aitbc.v1.MinerInfo as it declared it (ListMiners)
    running      integer NOT NULL DEFAULT 0,     -- jobs it runs, as of the owner's last renewal
    since        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX miner_sessions_by_coordinator ON miner_sessions (coordinator);
-- one sequence for every miner's epochs: a newer connection's epoch is higher than any before it,
-- even after the row was deleted (its stream ended, or its lease ran out)
CREATE SEQUENCE miner_session_epochs;

-- the client whose max_active_jobs a job counts against ('' for a split job's shard: its parent
-- counts), so SubmitJob counts a client's unfinished jobs on every coordinator in one indexed query
ALTER TABLE jobs ADD COLUMN client_id text COLLATE "C" NOT NULL DEFAULT '';
CREATE INDEX jobs_active_by_client ON jobs (client_id) WHERE active;
