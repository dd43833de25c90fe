-- The usage ledger: one row per attempt. Written for both SQLite and PostgreSQL, so
-- only types both know: TEXT, BIGINT (SQLite stores it as INTEGER), BOOLEAN (SQLite: 0/1).
-- Times are ms since the Unix epoch, UTC; money is integer nano-dollars.
CREATE TABLE ledger_attempts (
    request_id           TEXT    NOT NULL,
    attempt              BIGINT  NOT NULL,
    route                TEXT    NOT NULL,
    backend_id           TEXT    NOT NULL,
    backend_kind         TEXT    NOT NULL,
    backend_model        TEXT    NOT NULL,
    client_id            TEXT    NOT NULL,
    started_ms           BIGINT  NOT NULL,
    first_token_ms       BIGINT,
    ended_ms             BIGINT  NOT NULL,
    outcome              TEXT    NOT NULL,
    error_kind           TEXT,
    fallback_reason      TEXT,
    prompt_tokens        BIGINT  NOT NULL,
    completion_tokens    BIGINT  NOT NULL,
    cached_prompt_tokens BIGINT  NOT NULL,
    reasoning_tokens     BIGINT  NOT NULL,
    usage_estimated      BOOLEAN NOT NULL,
    unpriced             BOOLEAN NOT NULL,
    cost_nanos           BIGINT  NOT NULL,
    avoided_nanos        BIGINT  NOT NULL,
    -- A replayed row (spool, retried batch, a second writer) hits this key and is dropped.
    PRIMARY KEY (request_id, attempt)
);

-- Usage queries read a time range, then group.
CREATE INDEX ledger_attempts_started ON ledger_attempts (started_ms);
