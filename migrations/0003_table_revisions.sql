-- One revision marker per watched table, instead of one for the whole database.
--
-- table_revisions holds a row per table that a dataset reads; triggers on that table
-- add one to its row on every insert, update and delete. The refresh leader reads
-- all rows in one statement and reloads only the datasets whose tables moved. The
-- service installs the row and triggers for every table a declared dataset names
-- (quart_service/data/markers.py); this migration moves the models table over.

CREATE TABLE table_revisions (
    table_name TEXT PRIMARY KEY,
    revision   INTEGER NOT NULL DEFAULT 0
);
INSERT INTO table_revisions (table_name, revision)
SELECT 'models', revision FROM change_marker WHERE id = 1;

DROP TRIGGER models_changed_insert;
DROP TRIGGER models_changed_update;
DROP TRIGGER models_changed_delete;
DROP TABLE change_marker;

CREATE TRIGGER qs_revision_models_insert AFTER INSERT ON models
BEGIN
    UPDATE table_revisions SET revision = revision + 1 WHERE table_name = 'models';
END;

CREATE TRIGGER qs_revision_models_update AFTER UPDATE ON models
BEGIN
    UPDATE table_revisions SET revision = revision + 1 WHERE table_name = 'models';
END;

CREATE TRIGGER qs_revision_models_delete AFTER DELETE ON models
BEGIN
    UPDATE table_revisions SET revision = revision + 1 WHERE table_name = 'models';
END;
