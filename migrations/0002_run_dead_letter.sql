-- Which message made a run fail ("<topic>/<partition>/<offset>"), and when the worker had
-- that message's dead letter acknowledged by the broker. A redelivery of the very same
-- message (the worker died after the dead letter but before its offset was committed) is then
-- recognised: it starts no new run, and writes no second dead letter once one is stored.
ALTER TABLE fsm_runs
    ADD COLUMN failed_source    text,
    ADD COLUMN dead_lettered_at timestamptz;
