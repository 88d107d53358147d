-- qr schema, SQLite. Names follow Hydra's (lowercase, unquoted); see docs/schema.md for the
-- differences. Timestamps are unix seconds.

create table jobsets (
    name             text primary key not null,
    schedulingshares integer not null default 100 check (schedulingshares > 0)
);

create table builds (
    id             integer primary key autoincrement not null,
    jobset         text not null references jobsets(name) on delete cascade on update cascade,
    job            text not null,
    drvpath        text not null,
    system         text not null,
    priority       integer not null default 0,
    globalpriority integer not null default 0,
    maxsilent      integer not null default 3600,
    timeout        integer not null default 36000,
    timestamp      integer not null,          -- queue time
    finished       integer not null default 0 check (finished in (0, 1)),
    buildstatus    integer,                   -- status codes as in Hydra; set when finished
    starttime      integer,
    stoptime       integer,
    iscachedbuild  integer not null default 0 check (iscachedbuild in (0, 1)),
    laststepnr     integer not null default 0, -- qr: step-number allocator (see docs/schema.md)
    check (finished = 0 or buildstatus is not null),
    check (finished = 0 or (stoptime is not null and stoptime != 0)),
    check (finished = 0 or (starttime is not null and starttime != 0))
);

-- The queue: unfinished builds in scheduling order.
create index indexbuildsonunfinished on builds(globalpriority desc, priority desc, id) where finished = 0;
create index indexbuildsonjobset on builds(jobset);

create table buildoutputs (
    build integer not null references builds(id) on delete cascade,
    name  text not null,
    path  text,                               -- null until known (CA outputs)
    primary key (build, name)
);

create table buildsteps (
    build          integer not null references builds(id) on delete cascade,
    stepnr         integer not null,
    type           integer not null,          -- 0 = build, 1 = substitution
    drvpath        text not null,
    busy           integer not null default 0, -- 0 = not busy, else the busy phase
    status         integer,                   -- null while pending/running
    errormsg       text,
    starttime      integer,
    stoptime       integer,
    machine        text not null default '',
    system         text,
    propagatedfrom integer references builds(id) on delete cascade,
    overhead       integer,
    timesbuilt     integer,
    isnondeterministic integer,
    resolvedtostep integer,                   -- the step building this step's resolved drv
    primary key (build, stepnr),
    foreign key (build, resolvedtostep) references buildsteps(build, stepnr),
    -- status 13 (Resolved) and a resolvedtostep go together; a NULL status counts as "not 13".
    constraint buildsteps_resolved_check check ((coalesce(status, -1) = 13) = (resolvedtostep is not null))
);

-- Restart recovery: rows left busy by a crash.
create index indexbuildstepsonbusy on buildsteps(build, stepnr) where busy != 0;
-- Restart recovery: Resolved rows; and "which steps resolved to step N of build B".
create index indexbuildstepsonresolvedtostep on buildsteps(build, resolvedtostep) where status = 13;
create index indexbuildstepsonpropagatedfrom on buildsteps(propagatedfrom) where propagatedfrom is not null;
-- Scheduling shares: step time per jobset over a recent window.
create index indexbuildstepsonstoptime on buildsteps(stoptime) where starttime is not null and stoptime is not null;

create table buildstepoutputs (
    build  integer not null,
    stepnr integer not null,
    name   text not null,
    path   text,                              -- null until known (CA outputs)
    primary key (build, stepnr, name),
    foreign key (build, stepnr) references buildsteps(build, stepnr) on delete cascade
);

-- Cached failures (as in Hydra).
create table failedpaths (
    path text primary key not null
);

-- The derived build trace: drv path + output name -> output path, with the producing step.
create table realisations (
    drvpath    text not null,
    outputname text not null,
    outpath    text not null,
    build      integer,
    stepnr     integer,
    primary key (drvpath, outputname),
    foreign key (build, stepnr) references buildsteps(build, stepnr) on delete set null,
    check ((build is null) = (stepnr is null))
);

create index indexrealisationsonstep on realisations(build, stepnr) where build is not null;
