"""Alembic environment: runs migrations on the engine handed in by ``node.db.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, text

from node.db.engine import NO_DEADLINE, make_engine
from node.db.models import Base

target_metadata = Base.metadata
# Serializes concurrent upgrades from several node processes on PostgreSQL.
_PG_LOCK_KEY = 0x4C4C4D435852  # "LLMCXR"


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = context.config.attributes.get("engine")
    own = engine is None
    if own:
        engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "")
    assert isinstance(engine, Engine)
    try:
        with engine.connect() as connection:
            # a migration may wait for another process's (advisory lock) or rewrite a big
            # table: it runs without the statement timeouts of node.db.engine
            connection.execution_options(**{NO_DEADLINE: True})
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SET LOCAL statement_timeout = 0"))
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        if own:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
