-- Notifications (`[notify]` webhooks): the outbox, written in the same transaction as the state
-- change it announces, and delivered (at least once, each row with its fixed idempotency key) by
-- the runner's delivery task; see docs/ops.md "Notifications". Times are unix milliseconds.

-- One row per (event, webhook).
create table outbox (
    id              integer primary key autoincrement not null,   -- monotonic
    webhook         text not null,            -- the `[[notify.webhooks]]` name
    kind            text not null check (kind in ('build_started', 'build_finished', 'eval_completed')),
    build           integer,                  -- build events
    eval            integer,                  -- eval_completed
    key             text not null,            -- the idempotency key (X-Qr-Delivery), fixed at insert
    payload         text not null,            -- JSON: the event's facts at the time of the change
    open_start      integer check (open_start = 1), -- 1: the build's current build_started row
    created         integer not null,
    attempts        integer not null default 0,
    next_attempt_at integer not null,
    delivered_at    integer,
    last_error      text,
    unique (webhook, key)
);

-- One build_started per build and webhook until the build finishes (which clears it): the first
-- step to start announces the build, the others insert nothing.
create unique index outboxoneopenstart on outbox(webhook, build) where open_start = 1;
-- What a webhook's delivery task reads: its undelivered rows by due time.
create index outboxdue on outbox(webhook, next_attempt_at) where delivered_at is null;
create index outboxonbuild on outbox(build) where build is not null;

-- nix-eval-jobs' `meta.repo` / `meta.rev` of a job (the github-status format's repository and
-- commit), when the line carries them.
alter table jobsetevalmembers add column repo text;
alter table jobsetevalmembers add column rev text;
