"""Running the service: the ``quart-service`` command, the supervisor, its workers."""
