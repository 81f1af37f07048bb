-- The rows a notice claimed, found by its id: every hold, accepted notice and
-- unclaim looks them up, and without this index each of them read the whole
-- held table (the hold row of the benchmark slowed as the table grew).
-- Additive: the previous release runs unchanged beside it.
CREATE INDEX IF NOT EXISTS held_claimed ON held (claimed_by) WHERE claimed_by IS NOT NULL;
