-- Schema versions (contract/versioning.py): each row keeps the `v` of the result it was written
-- from (NULL: written before versions, i.e. 1.0) and the result's fields this writer did not know
-- (`extra`), so a newer version's stage result is not lost when an older writer stores it during
-- a rollout. Additive and nullable: writers of the previous version keep inserting as before.

ALTER TABLE scans ADD COLUMN v text, ADD COLUMN extra jsonb;
