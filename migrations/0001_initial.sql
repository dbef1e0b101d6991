-- flyio-image-manager schema, version 1.
--
-- PostgreSQL is shared by every host of a fleet. Rows that describe something that exists on
-- one host only (a tarball on its disk, a device in its thin pool) carry that host's id.

-- The download stage's view of an image: the seed's statuses pending, downloading,
-- completed, failed.
CREATE TABLE images (
    host_id       text        NOT NULL,
    image_id      text        NOT NULL,
    bucket        text        NOT NULL,
    s3_key        text        NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'downloading', 'completed', 'failed')),
    local_path    text,
    checksum      text,
    size_bytes    bigint,
    etag          text,
    error         text,
    run_id        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    downloaded_at timestamptz,
    PRIMARY KEY (host_id, image_id)
);
CREATE INDEX images_by_status ON images (host_id, status);

-- Thin device ids (24-bit) per host and pool. The state is written before each dm message
-- ('creating', 'deleting') and after it ('ready'), so that a crash between the two leaves a
-- row that says what to check and repair.
CREATE TABLE thin_devices (
    host_id         text        NOT NULL,
    pool_name       text        NOT NULL,
    device_id       integer     NOT NULL CHECK (device_id BETWEEN 0 AND 16777215),
    -- 'unknown': an id found in the pool that no run of ours made; reserved, never reused.
    kind            text        NOT NULL CHECK (kind IN ('origin', 'snapshot', 'unknown')),
    state           text        NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    size_bytes      bigint      NOT NULL,
    checksum        text,       -- origin: SHA-256 of the tarball it was made from
    origin_id       integer,    -- snapshot: the origin's device id
    extracted_bytes bigint,     -- origin: bytes of file data extracted
    file_count      bigint,     -- origin: entries extracted
    run_id          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, pool_name, device_id)
);
-- Content dedup: at most one live origin per tarball checksum in a pool.
CREATE UNIQUE INDEX thin_devices_one_origin_per_checksum
    ON thin_devices (host_id, pool_name, checksum)
    WHERE kind = 'origin' AND state <> 'deleting';

-- Which origin holds an image's files. Two images with the same tarball share one origin.
CREATE TABLE unpacked_images (
    host_id     text        NOT NULL,
    image_id    text        NOT NULL,
    pool_name   text        NOT NULL,
    device_id   integer     NOT NULL,
    checksum    text        NOT NULL,
    run_id      text,
    unpacked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, image_id),
    FOREIGN KEY (host_id, pool_name, device_id)
        REFERENCES thin_devices (host_id, pool_name, device_id)
);

-- Activated snapshots: the writable roots VMs boot from.
CREATE TABLE snapshots (
    host_id       text        NOT NULL,
    snapshot_name text        NOT NULL,
    image_id      text        NOT NULL,
    pool_name     text        NOT NULL,
    device_id     integer     NOT NULL,
    origin_id     integer     NOT NULL,
    device_path   text        NOT NULL,
    state         text        NOT NULL
                  CHECK (state IN ('creating', 'active', 'inactive', 'deleting')),
    run_id        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz,
    PRIMARY KEY (host_id, snapshot_name),
    FOREIGN KEY (host_id, pool_name, device_id)
        REFERENCES thin_devices (host_id, pool_name, device_id)
);
CREATE INDEX snapshots_by_image ON snapshots (host_id, image_id);

-- One row per FSM run: request, latest response, progress and lease.
CREATE TABLE fsm_runs (
    run_id          text        PRIMARY KEY,          -- ULID
    fsm             text        NOT NULL,             -- download, unpack, activate, ...
    host_id         text        NOT NULL,
    idempotency_key text        NOT NULL,
    request         jsonb       NOT NULL,
    response        jsonb,
    state           text        NOT NULL,             -- last completed transition, or 'start'
    next_transition integer     NOT NULL DEFAULT 0,   -- index of the first incomplete one
    status          text        NOT NULL
                    CHECK (status IN ('pending', 'running', 'complete', 'failed', 'aborted')),
    attempt         integer     NOT NULL DEFAULT 1,
    max_attempts    integer     NOT NULL,
    error           text,
    error_detail    text,
    error_class     text        CHECK (error_class IN ('transient', 'permanent')),
    lease_owner     text,
    lease_until     timestamptz,
    trace_id        text,
    parent_run_id   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX fsm_runs_by_key ON fsm_runs (idempotency_key);
CREATE INDEX fsm_runs_by_status ON fsm_runs (status, lease_until);

-- Append-only history of every run, for `status --run-id`.
CREATE TABLE fsm_events (
    id         bigserial   PRIMARY KEY,
    run_id     text        NOT NULL REFERENCES fsm_runs (run_id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind       text        NOT NULL CHECK (kind IN ('start', 'resume', 'transition_start',
                           'transition_complete', 'error', 'retry', 'abort', 'fail',
                           'finish', 'release')),
    transition text,
    attempt    integer     NOT NULL,
    worker     text,
    detail     text
);
CREATE INDEX fsm_events_by_run ON fsm_events (run_id, id);

-- At most one live run per idempotency key: the primary key makes a second impossible.
-- A failed key may be taken again by a new run (a replay); a complete one never.
CREATE TABLE idempotency_keys (
    key          text        PRIMARY KEY,
    fsm          text        NOT NULL,
    host_id      text        NOT NULL,
    run_id       text        NOT NULL UNIQUE REFERENCES fsm_runs (run_id),
    status       text        NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);

-- Transactional outbox: the next stage's request, written in the transaction that completes
-- a run and published to Kafka afterwards.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    host_id      text        NOT NULL,
    run_id       text        NOT NULL,
    topic        text        NOT NULL,
    message_key  text        NOT NULL,
    payload      text        NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE UNIQUE INDEX outbox_one_handoff_per_run ON outbox (run_id, topic);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
