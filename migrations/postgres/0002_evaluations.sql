-- Evaluations (`qr submit --eval-jobs`), as Hydra's jobsetevals / jobsetevalmembers /
-- aggregateconstituents; see docs/schema.md. Timestamps are unix seconds.

-- One row per submit of nix-eval-jobs' lines.
create table jobsetevals (
    id        bigserial primary key not null,
    jobset    text not null references jobsets(name) on delete cascade on update cascade,
    timestamp bigint not null,                -- when the evaluation was recorded
    source    text not null default ''        -- where the lines came from (file name, or "-")
);

create index indexjobsetevalsonjobset on jobsetevals(jobset, id);

-- The jobs of an evaluation and their builds: a job queued by this evaluation (isnew = 1) or one
-- whose drv already had a build in the jobset (isnew = 0).
create table jobsetevalmembers (
    eval  bigint not null references jobsetevals(id) on delete cascade,
    job   text not null,                      -- the attr, as nix-eval-jobs names it
    build bigint not null references builds(id) on delete cascade,
    isnew integer not null check (isnew in (0, 1)),
    primary key (eval, job)
);

create index indexjobsetevalmembersonbuild on jobsetevalmembers(build);

-- The lines of an evaluation that queued nothing: an `error` from the evaluator, or a line qr
-- could not use (malformed JSON, a missing field, a drv it could not import), with its line number.
create table jobsetevalerrors (
    eval    bigint not null references jobsetevals(id) on delete cascade,
    line    bigint not null,                  -- 1-based line number of the input
    job     text,                             -- the attr, when the line names one
    message text not null,
    primary key (eval, line)
);

-- Aggregate jobs (Hydra's AggregateConstituents): the aggregate build succeeds only when every
-- constituent build does.
create table aggregateconstituents (
    aggregate   bigint not null references builds(id) on delete cascade,
    constituent bigint not null references builds(id) on delete cascade,
    primary key (aggregate, constituent),
    check (aggregate != constituent)
);

create index indexaggregateconstituentsonconstituent on aggregateconstituents(constituent);

-- "Does this drv already have a build in the jobset" (one lookup per job of an evaluation).
create index indexbuildsonjobsetdrvpath on builds(jobset, drvpath);
