-- Version 4 is the shared reputation and verification rows (another slice of issue 18, written
-- beside this one). This file only holds the number so that 0005 applies in a checkout without it:
-- the merge replaces it with that migration.
SELECT 1;
