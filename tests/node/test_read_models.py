"""node.db.read_models: a read model from an ORM row, by field name (rows in SQLite)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from node.db.models import ApiRole, ApiToken, Base
from node.db.read_models import read_model
from node.db.tokens import TokenRow


def _stored_token(tmp_path: Path) -> ApiToken:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        tok = ApiToken(
            name="ci",
            role=ApiRole.operator,
            token_hash="0" * 64,
            created_at=datetime(2026, 12, 6, 10, 0, tzinfo=UTC),
        )
        session.add(tok)
        session.commit()
        return tok


def test_fields_come_from_the_row_and_enums_become_their_values(tmp_path: Path) -> None:
    tok = _stored_token(tmp_path)
    row = read_model(TokenRow, tok)
    assert row == TokenRow(
        id=tok.id,
        name="ci",
        role="operator",
        created_at=datetime(2026, 12, 6, 10, 0, tzinfo=UTC),
        revoked_at=None,
        last_used_at=None,
    )
    assert type(row.role) is str


def test_given_values_win_and_are_kept_as_given(tmp_path: Path) -> None:
    tok = _stored_token(tmp_path)
    row = read_model(TokenRow, tok, name="renamed", role=ApiRole.admin)
    assert row.name == "renamed" and row.role is ApiRole.admin  # a given value is not converted
    assert row.id == tok.id


def test_an_unknown_value_or_a_field_the_row_lacks_is_an_error(tmp_path: Path) -> None:
    tok = _stored_token(tmp_path)
    with pytest.raises(TypeError, match="TokenRow has no field colour"):
        read_model(TokenRow, tok, colour="red")

    @dataclass(frozen=True)
    class WithSecret:
        id: int
        secret: str

    with pytest.raises(AttributeError, match="secret"):
        read_model(WithSecret, tok)
    assert read_model(WithSecret, tok, secret="given") == WithSecret(tok.id, "given")
