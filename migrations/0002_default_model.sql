-- A model that works out of the box: the built-in n-gram engine on its bundled corpus.
INSERT INTO models (name, engine, parameters)
VALUES ('local-ngram', 'local', '{"order": 3}');
