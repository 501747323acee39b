-- The data that worker singletons load, and the change marker that says it moved.
--
-- change_marker.revision is bumped by triggers on every insert, update and delete of
-- a refreshable table, so a change made by any writer (another service, the sqlite3
-- shell) is seen by the leader's one-row poll.

CREATE TABLE change_marker (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO change_marker (id, revision) VALUES (1, 0);

CREATE TABLE models (
    name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    engine     TEXT NOT NULL CHECK (length(engine) BETWEEN 1 AND 100),
    parameters TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(parameters)),
    enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TRIGGER models_changed_insert AFTER INSERT ON models
BEGIN
    UPDATE change_marker SET revision = revision + 1 WHERE id = 1;
END;

CREATE TRIGGER models_changed_update AFTER UPDATE ON models
BEGIN
    UPDATE change_marker SET revision = revision + 1 WHERE id = 1;
END;

CREATE TRIGGER models_changed_delete AFTER DELETE ON models
BEGIN
    UPDATE change_marker SET revision = revision + 1 WHERE id = 1;
END;
