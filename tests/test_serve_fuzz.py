"""Schema fuzzing of the REST API with schemathesis, bounded in examples (and so in time).

Every operation of the OpenAPI document gets generated requests (random multipart bodies,
query flags, headers); every answer must be a documented status code with a body that matches
its schema, and never a 5xx.
"""

from __future__ import annotations

import pytest
import torch

from covidcxr import models
from covidcxr.preprocess import get_preset

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    from covidcxr.serve import create_app

    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("fuzz") / "tiny.ckpt"
    models.save(ckpt, models.build("resnet18", num_classes=3), arch="resnet18",
                classes=["normal", "pneumonia", "COVID-19"], preset=get_preset("deepcovid", size=64), threshold=0.5)
    app = create_app(ckpt, api_key=KEY, max_upload_mb=0.5)
    # /openapi.json follows the API key rule too (issue 11 §9)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": KEY})


def test_api_conforms_to_its_schema(api_schema) -> None:
    # Plain hypothesis over each operation's strategy (schemathesis' lazy pytest fixture loader does not
    # work with this pytest version); 25 examples per operation keeps it to a few seconds.
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    seen = set()
    for result in api_schema.get_all_operations():
        op = result.ok()
        seen.add((op.method.upper(), op.path))

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case) -> None:
            # positive_data_acceptance is off: the schema says "binary file", and random bytes are
            # rightly refused (415/422) because the content is checked by decoding it.
            case.call_and_validate(headers={"X-API-Key": KEY}, excluded_checks=[positive_data_acceptance])

        run()
    assert {("GET", "/healthz"), ("GET", "/v1/model"), ("POST", "/v1/predict")} <= seen
