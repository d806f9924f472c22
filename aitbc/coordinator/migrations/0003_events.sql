-- Version 3: progress and text of a job across coordinators (docs/scaling.md, "Events across
-- coordinators"). The owner of a job appends its progress and streamed text here only while a
-- coordinator other than itself watches the job (a live row in `watchers`), and sends
-- NOTIFY aitbc_events with the same commit; a watching coordinator reads the rows past the last
-- id it saw of each watched job. State changes are not rows: the job row is their truth.

CREATE TABLE job_events (
    id       bigserial PRIMARY KEY,
    job_id   text COLLATE "C" NOT NULL,
    kind     smallint NOT NULL,          -- 1: JobProgress, 2: TextChunk (offset, text) of the attempt
    attempt  integer NOT NULL,           -- the job's attempt: a requeued job's text starts again at 0
    payload  bytea NOT NULL,             -- the message, serialized
    created  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);      -- job_id = ANY($watched) AND id > $last
CREATE INDEX job_events_by_created ON job_events (created);    -- old rows deleted in batches

CREATE TABLE watchers (                 -- a coordinator streaming a job to a WatchJob of its own
    job_id       text COLLATE "C" NOT NULL,
    coordinator  text COLLATE "C" NOT NULL,
    expires      timestamptz NOT NULL,  -- refreshed while the watch lasts; an expired row is ignored
    PRIMARY KEY (job_id, coordinator)
);
CREATE INDEX watchers_by_expiry ON watchers (expires);
