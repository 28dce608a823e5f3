"""Tables, engine set-up and migrations for SQLite and PostgreSQL."""
