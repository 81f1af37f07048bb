-- The grant ledger (README, "The grant ledger"). Every table lives in the
-- schema NOTIFIER_LEDGER_SCHEMA (the connection's search_path). Later
-- migrations only add (columns with defaults, tables, indexes), so a replica
-- of the previous release keeps working beside a new one that migrated.

-- Per user and template: the credits WeChat will still accept, and whether
-- the count is exact (after a 43101 or an `off`) or a lower bound.
CREATE TABLE IF NOT EXISTS credits (
    user_id     text        NOT NULL,
    template_id text        NOT NULL,
    count       integer     NOT NULL DEFAULT 0 CHECK (count >= 0),
    exact       boolean     NOT NULL DEFAULT false,
    -- Raised by every counted subscription event: a hold sets an exact 0
    -- only if no credit was counted after the notice read the ledger.
    version     bigint      NOT NULL DEFAULT 0,
    -- When a user held at an exact 0 last had a real call (the credit probe).
    probed_at   timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, template_id)
);

-- The openid last seen per user (a subscription event or an assignment).
CREATE TABLE IF NOT EXISTS users (
    user_id text        PRIMARY KEY,
    openid  text,
    seen_at timestamptz NOT NULL DEFAULT now()
);

-- The events that wait for an accept: the original body, why, since when
-- (the database's clock), and the notice that claimed them before its call.
CREATE TABLE IF NOT EXISTS held (
    event_id    text        PRIMARY KEY,
    user_id     text        NOT NULL,
    template_id text        NOT NULL,
    body        bytea       NOT NULL,
    reason      text        NOT NULL,
    errcode     integer,
    held_at     timestamptz NOT NULL DEFAULT now(),
    claimed_by  text,
    traceparent text,
    attempts    integer     NOT NULL DEFAULT 0,
    -- Arrival order within one hold (a notice's events share one held_at).
    seq         bigint      GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS held_user ON held (user_id, template_id, held_at, seq);
CREATE INDEX IF NOT EXISTS held_age ON held (held_at) WHERE claimed_by IS NULL;

-- Events that left the ledger (released, expired) and subscription events
-- already counted: a redelivered copy is recognised for NOTIFIER_HOLD_FOR.
CREATE TABLE IF NOT EXISTS settled (
    event_id text        PRIMARY KEY,
    kind     text        NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS settled_at ON settled (at);

-- Accepted notices: a decrement is counted once per notice_id.
CREATE TABLE IF NOT EXISTS sends (
    notice_id   text        PRIMARY KEY,
    user_id     text        NOT NULL,
    template_id text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sends_at ON sends (at);

-- A spell of holding per user and template: `notifier.notice_held` is
-- published once per spell, again by the sweep until the broker confirmed it.
CREATE TABLE IF NOT EXISTS spells (
    user_id          text        NOT NULL,
    template_id      text        NOT NULL,
    reason           text        NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    signal_confirmed boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (user_id, template_id)
);
