-- Version 4: shared hub state (docs/scaling.md, "What exists today (fifth slice)"). Reputation
-- rows (table `reputation`, version 1) are the truth for every coordinator: each update locks the
-- miner's row and sends NOTIFY aitbc_reputation, '<miner>' with its commit. A verification
-- decision is taken once: the coordinator that inserts the (job, runs) row first decides the
-- original job with that many runs; a row whose coordinator died (its advisory lock free) is taken
-- over by the next one that tries.

CREATE TABLE verification_decisions (
    job_id       text COLLATE "C" NOT NULL,  -- the original job (not a re-execution)
    runs         integer NOT NULL,           -- the runs decided on: the original and its re-executions
    coordinator  text COLLATE "C" NOT NULL,  -- coordinators.id of the one deciding
    claimed      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, runs)
);
CREATE INDEX verification_decisions_by_claimed ON verification_decisions (claimed);  -- old rows deleted in batches
