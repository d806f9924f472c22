-- Version 2: several coordinators on one database (docs/scaling.md, issue 18).
-- A job's queue position, owner and lease are columns: a coordinator claims queued rows with
-- FOR UPDATE SKIP LOCKED, every later write of a claimed job is fenced by (owner, claim_epoch),
-- and any coordinator's reaper requeues jobs whose lease expired or whose owner died.

ALTER TABLE jobs
    ADD COLUMN state             integer NOT NULL DEFAULT 0,      -- aitbc.v1.JobState
    ADD COLUMN model             text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN priority          bigint NOT NULL DEFAULT 0,       -- a paid job's fee per unit (millionths); 0: free
    ADD COLUMN created_ms        bigint NOT NULL DEFAULT 0,       -- the queue order among equals
    ADD COLUMN queued_ms         bigint NOT NULL DEFAULT 0,       -- when it was last queued (queue_ttl_s)
    ADD COLUMN verify            boolean NOT NULL DEFAULT false,  -- a re-execution (verify_timeout_s)
    ADD COLUMN owner             text COLLATE "C",                -- the coordinator that claimed it; NULL: free
    ADD COLUMN claim_epoch       bigint NOT NULL DEFAULT 0,       -- bumped at each claim: the fence
    ADD COLUMN lease_until       timestamptz,                     -- the owner renews it every heartbeat interval
    ADD COLUMN cancel_requested  boolean NOT NULL DEFAULT false,  -- CancelJob on a coordinator that is not the owner
    ADD COLUMN excluded          text[] NOT NULL DEFAULT '{}';    -- miners whose result for it was rejected

-- rows written by version 1 (one coordinator): their state and order from the columns we can fill
UPDATE jobs SET state = CASE WHEN active THEN 1 ELSE 0 END WHERE state = 0;

CREATE INDEX jobs_queue ON jobs (model, priority DESC, created_ms, job_id) WHERE state = 1 AND owner IS NULL;
CREATE INDEX jobs_owned ON jobs (owner) WHERE active AND owner IS NOT NULL;

CREATE TABLE coordinators (            -- every coordinator that opened the database
    id          text COLLATE "C" PRIMARY KEY,
    lock_key    bigint NOT NULL UNIQUE,  -- a session advisory lock it holds while alive
    started_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservations (            -- what each accepted paid job holds of its client's escrow
    job_id          text COLLATE "C" PRIMARY KEY,
    client_address  text COLLATE "C" NOT NULL,
    total           bigint NOT NULL,
    quote_hash      text COLLATE "C" NOT NULL,
    units           bigint NOT NULL
);
CREATE INDEX reservations_by_client ON reservations (client_address);

CREATE TABLE used_quotes (             -- each quote pays for one job: the insert is the check
    quote_id    text COLLATE "C" PRIMARY KEY,
    job_id      text COLLATE "C" NOT NULL,
    expires_ms  bigint NOT NULL
);
