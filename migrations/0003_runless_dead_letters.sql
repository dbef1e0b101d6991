-- Dead letters of messages that never got a run (not JSON, an invalid request, or a stage
-- call that could not record a run): which message ("<topic>/<partition>/<offset>"), the
-- SHA-256 of its value, and when the broker acknowledged its dead letter. A redelivery of the
-- very same message (the worker died after the dead letter but before its offset was
-- committed) then writes no second dead letter; runs record this on fsm_runs instead (0002).
-- The digest keeps a topic that was deleted and created again, whose offsets start over, from
-- matching an old row. Topics are shared by every host, so the rows are too; host_id only says
-- which worker wrote the dead letter. Rows older than 30 days are pruned as new ones are
-- written: a redelivery comes within minutes.
CREATE TABLE runless_dead_letters (
    source       text        NOT NULL,
    value_sha256 text        NOT NULL,
    host_id      text        NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, value_sha256)
);
CREATE INDEX runless_dead_letters_stored_at ON runless_dead_letters (stored_at);
