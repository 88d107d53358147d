-- Restart recovery at scale (docs/schema.md "Restart recovery"): the rows without a status are
-- the unfinished ones (pending, or busy); recovery finds the pending targets of Resolved rows in
-- finished builds through them, never through the Resolved rows of the whole history.
create index indexbuildstepsonpending on buildsteps(build, stepnr) where status is null;
