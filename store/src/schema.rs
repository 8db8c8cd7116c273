//! The schema of each backend, as forward migrations. Entry `i` takes a database from version
//! `i` to `i + 1`; a released entry is never edited, a change is a new entry. SQLite keeps its
//! version in `PRAGMA user_version`, PostgreSQL in the table `balsam_schema`.
//!
//! Both backends hold the same tables, columns and indexes, so the store's queries read the
//! same on both. PostgreSQL's differences: identity columns for SQLite's row ids (events keep a
//! column named `rowid`, which SQLite has implicitly), BIGINT for every integer (one integer
//! type binds everywhere), BYTEA for blobs, the C collation (byte order, as SQLite compares
//! text), and the two SQLite functions the queries call (`instr`, `hex`) defined in SQL.

/// SQLite.
pub(crate) const SQLITE: &[&str] = &[
    r#"
CREATE TABLE applications (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    executable  TEXT NOT NULL,
    preprocess  TEXT NOT NULL DEFAULT '',
    postprocess TEXT NOT NULL DEFAULT '',
    envscript   TEXT NOT NULL DEFAULT ''
);

-- One row per planned application run. job_id is the UUID's 16 bytes; pk is the row number
-- that edges, events and leases refer to (8 bytes instead of 16, and insertion-ordered).
CREATE TABLE jobs (
    pk                   INTEGER PRIMARY KEY,
    job_id               BLOB NOT NULL,
    workflow             TEXT NOT NULL,
    name                 TEXT NOT NULL,
    description          TEXT NOT NULL,
    input_files          TEXT NOT NULL,
    stage_in_url         TEXT NOT NULL,
    stage_out_files      TEXT NOT NULL,
    stage_out_url        TEXT NOT NULL,
    wall_time_minutes    INTEGER NOT NULL,
    num_nodes            INTEGER NOT NULL,
    coschedule_num_nodes INTEGER NOT NULL,
    ranks_per_node       INTEGER NOT NULL,
    cpu_affinity         TEXT NOT NULL,
    threads_per_rank     INTEGER NOT NULL,
    threads_per_core     INTEGER NOT NULL,
    node_packing_count   INTEGER NOT NULL,
    environ_vars         TEXT NOT NULL,
    mpi_flags            TEXT NOT NULL,
    application          TEXT NOT NULL,
    args                 TEXT NOT NULL,
    user_workdir         TEXT NOT NULL,
    wait_for_parents     INTEGER NOT NULL,
    post_error_handler   INTEGER NOT NULL,
    post_timeout_handler INTEGER NOT NULL,
    auto_timeout_retry   INTEGER NOT NULL,
    max_restarts         INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    state                INTEGER NOT NULL,
    return_code          INTEGER,
    num_restarts         INTEGER NOT NULL DEFAULT 0,
    queued_launch_id     INTEGER,
    lease_session        INTEGER
);
CREATE UNIQUE INDEX jobs_job_id ON jobs(job_id);
-- Replaced by jobs_state in version 3.
CREATE INDEX jobs_state_workflow ON jobs(state, workflow);
-- Only leased jobs are in it: small, and finds a session's jobs without a scan.
CREATE INDEX jobs_lease ON jobs(lease_session) WHERE lease_session IS NOT NULL;

-- Dependencies, indexed both ways: children of a parent and parents of a child by index.
CREATE TABLE deps (
    parent INTEGER NOT NULL,
    child  INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE INDEX deps_child ON deps(child, parent);

-- The provenance log: every state change, with UTC microseconds.
CREATE TABLE events (
    job        INTEGER NOT NULL,
    time_us    INTEGER NOT NULL,
    from_state INTEGER,
    to_state   INTEGER NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX events_job ON events(job);

-- Launcher and service processes that hold leases.
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    batch_job_id TEXT NOT NULL,
    job_mode     TEXT NOT NULL,
    wf_filter    TEXT NOT NULL,
    started_us   INTEGER NOT NULL,
    heartbeat_us INTEGER NOT NULL,
    ended_us     INTEGER
);
CREATE INDEX sessions_live ON sessions(heartbeat_us) WHERE ended_us IS NULL;

-- Batch jobs that run launchers.
CREATE TABLE launches (
    id                INTEGER PRIMARY KEY,
    scheduler_id      TEXT NOT NULL,
    scheduler         TEXT NOT NULL,
    project           TEXT NOT NULL,
    queue             TEXT NOT NULL,
    nodes             INTEGER NOT NULL,
    wall_minutes      INTEGER NOT NULL,
    job_mode          TEXT NOT NULL,
    wf_filter         TEXT NOT NULL,
    command           TEXT NOT NULL,
    state             TEXT NOT NULL,
    sched_flags       TEXT NOT NULL,
    from_balsam       INTEGER NOT NULL,
    prescheduled_only INTEGER NOT NULL,
    reason            TEXT NOT NULL,
    created_us        INTEGER NOT NULL,
    updated_us        INTEGER NOT NULL
);
CREATE INDEX launches_scheduler_id ON launches(scheduler_id);
"#,
    // Version 2: a session's process identity (boot id and start time), so a launcher on the same
    // host can tell that another launcher's process is gone and take its jobs back at once.
    r#"
ALTER TABLE sessions ADD COLUMN proc_id TEXT NOT NULL DEFAULT '';
"#,
    STATE_INDEX,
];

/// Version 3 (SQLite), 2 (PostgreSQL): jobs by state in row order, instead of by state and
/// workflow. Every query by state wants row order: a lease takes the oldest runnable jobs,
/// `ls --state` and `ls --by-states` list the first rows of a state, a count reads the index
/// alone; none can use the workflow (filters match substrings). New jobs are appended to
/// the index (CREATED, rising row numbers) instead of being spread over a million workflow
/// keys: a bulk import of 1.2M jobs writes it 1.2 times faster on SQLite and 1.2 times on
/// PostgreSQL.
const STATE_INDEX: &str = "
DROP INDEX jobs_state_workflow;
CREATE INDEX jobs_state ON jobs(state, pk);
";

/// PostgreSQL.
pub(crate) const POSTGRES: &[&str] = &[
    r#"
CREATE FUNCTION instr(text, text) RETURNS integer
    AS $$ SELECT strpos($1, $2) $$ LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION hex(bytea) RETURNS text
    AS $$ SELECT upper(encode($1, 'hex')) $$ LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE;

CREATE TABLE applications (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    executable  TEXT NOT NULL,
    preprocess  TEXT NOT NULL DEFAULT '',
    postprocess TEXT NOT NULL DEFAULT '',
    envscript   TEXT NOT NULL DEFAULT ''
);

CREATE TABLE jobs (
    pk                   BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    job_id               BYTEA NOT NULL,
    workflow             TEXT COLLATE "C" NOT NULL,
    name                 TEXT COLLATE "C" NOT NULL,
    description          TEXT NOT NULL,
    input_files          TEXT NOT NULL,
    stage_in_url         TEXT NOT NULL,
    stage_out_files      TEXT NOT NULL,
    stage_out_url        TEXT NOT NULL,
    wall_time_minutes    BIGINT NOT NULL,
    num_nodes            BIGINT NOT NULL,
    coschedule_num_nodes BIGINT NOT NULL,
    ranks_per_node       BIGINT NOT NULL,
    cpu_affinity         TEXT NOT NULL,
    threads_per_rank     BIGINT NOT NULL,
    threads_per_core     BIGINT NOT NULL,
    node_packing_count   BIGINT NOT NULL,
    environ_vars         TEXT NOT NULL,
    mpi_flags            TEXT NOT NULL,
    application          TEXT COLLATE "C" NOT NULL,
    args                 TEXT NOT NULL,
    user_workdir         TEXT NOT NULL,
    wait_for_parents     BIGINT NOT NULL,
    post_error_handler   BIGINT NOT NULL,
    post_timeout_handler BIGINT NOT NULL,
    auto_timeout_retry   BIGINT NOT NULL,
    max_restarts         BIGINT NOT NULL,
    data                 TEXT NOT NULL,
    state                BIGINT NOT NULL,
    return_code          BIGINT,
    num_restarts         BIGINT NOT NULL DEFAULT 0,
    queued_launch_id     BIGINT,
    lease_session        BIGINT
);
CREATE UNIQUE INDEX jobs_job_id ON jobs(job_id);
CREATE INDEX jobs_state_workflow ON jobs(state, workflow);
CREATE INDEX jobs_lease ON jobs(lease_session) WHERE lease_session IS NOT NULL;

CREATE TABLE deps (
    parent BIGINT NOT NULL,
    child  BIGINT NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE INDEX deps_child ON deps(child, parent);

CREATE TABLE events (
    rowid      BIGINT GENERATED BY DEFAULT AS IDENTITY,
    job        BIGINT NOT NULL,
    time_us    BIGINT NOT NULL,
    from_state BIGINT,
    to_state   BIGINT NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX events_job ON events(job, rowid);

CREATE TABLE sessions (
    id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind         TEXT NOT NULL,
    host         TEXT COLLATE "C" NOT NULL,
    pid          BIGINT NOT NULL,
    batch_job_id TEXT NOT NULL,
    job_mode     TEXT NOT NULL,
    wf_filter    TEXT NOT NULL,
    started_us   BIGINT NOT NULL,
    heartbeat_us BIGINT NOT NULL,
    ended_us     BIGINT,
    proc_id      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sessions_live ON sessions(heartbeat_us) WHERE ended_us IS NULL;

CREATE TABLE launches (
    id                BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    scheduler_id      TEXT NOT NULL,
    scheduler         TEXT NOT NULL,
    project           TEXT NOT NULL,
    queue             TEXT NOT NULL,
    nodes             BIGINT NOT NULL,
    wall_minutes      BIGINT NOT NULL,
    job_mode          TEXT NOT NULL,
    wf_filter         TEXT NOT NULL,
    command           TEXT NOT NULL,
    state             TEXT NOT NULL,
    sched_flags       TEXT NOT NULL,
    from_balsam       BIGINT NOT NULL,
    prescheduled_only BIGINT NOT NULL,
    reason            TEXT NOT NULL,
    created_us        BIGINT NOT NULL,
    updated_us        BIGINT NOT NULL
);
CREATE INDEX launches_scheduler_id ON launches(scheduler_id);
"#,
    STATE_INDEX,
];
