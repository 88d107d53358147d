-- Dynamic derivations (docs/schema.md "Dynamic derivations"): a step whose output holds a .drv
-- is linked to the rows of the steps that build that produced drv, as a Resolved row is linked
-- to its resolved step. A row is written in the transaction that creates the produced drv's
-- row; the producer's row is the one its realisation names.
create table producedsteps (
    build         bigint not null,          -- the producer's row
    stepnr        integer not null,
    output        text not null,            -- its output holding the produced drv
    producedbuild bigint not null,          -- a row of the produced drv (any build)
    producedstep  integer not null,
    primary key (producedbuild, producedstep, build, stepnr, output),
    foreign key (build, stepnr) references buildsteps(build, stepnr) on delete cascade,
    foreign key (producedbuild, producedstep) references buildsteps(build, stepnr) on delete cascade
);

-- A build's step tree: the rows its producers link to.
create index indexproducedstepsonproducer on producedsteps(build, stepnr);
