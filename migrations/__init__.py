"""Alembic migrations (the only source of DDL). Run `carcert migrate` or store.db.init_db()."""
