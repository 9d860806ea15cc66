"""Alembic migrations of the node's database (packaged; run by ``node.db.migrate``)."""
