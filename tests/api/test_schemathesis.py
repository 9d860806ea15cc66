"""Property-based run (Schemathesis) against the published OpenAPI schema: no 5xx.

The API runs for real (uvicorn, SQLite, the demo model); every operation gets at most
:data:`MAX_EXAMPLES` generated requests sent with an admin token (so that the handlers run,
not just the authentication), the model tasks fewer because each runs the model.
``DELETE /api/tokens/{token_id}`` is left out: it could revoke the token the run uses (it is
covered in ``test_auth.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from node.runtime.modelhost import ModelHost
from tests.api.conftest import ApiEnv, start_env, stop_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_EXAMPLES = 30
MODEL_EXAMPLES = 6


@pytest.fixture(scope="module")
def fuzz_env(
    tmp_path_factory: pytest.TempPathFactory, rg1_template: bytes, model_host: ModelHost
) -> Iterator[ApiEnv]:
    env = start_env(Path(tmp_path_factory.mktemp("fuzz")), rg1_template, model_host)
    env.seed("queued")
    env.seed("failed")
    env.seed("done", draft="No acute process.", destination="PACS@127.0.0.1:1")
    yield env
    stop_env(env)


def _is_model(path: str) -> bool:
    return path in ("/api/generate-image", "/api/report") or path.endswith("/vqa")


def test_no_server_errors(fuzz_env: ApiEnv) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_env.base}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_env.tokens['admin']}"}
    failures: list[str] = []
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()  # type: ignore[union-attr]
        if op.method.upper() == "DELETE" and op.path == "/api/tokens/{token_id}":
            continue

        @given(case=op.as_strategy())
        @settings(
            max_examples=MODEL_EXAMPLES if _is_model(op.path) else MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def run(case: schemathesis.Case) -> None:
            key = f"{case.method.upper()} {case.operation.path}"
            calls[key] = calls.get(key, 0) + 1
            response = case.call(headers=headers)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

        run()
    print(f"schemathesis {schemathesis.SCHEMATHESIS_VERSION}: {calls}")
    assert len(calls) >= 15  # every operation of the schema was exercised
    assert failures == []
