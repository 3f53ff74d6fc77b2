"""A route refuses query parameters it does not declare (FastAPI alone would ignore them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.testclient import TestClient

from sage_ray.serve.ingress import install_error_handlers
from sage_ray.serve.query import declared_query_only


def limit_param(limit: int = Query(10)) -> int:
    return limit


def client() -> TestClient:
    router = APIRouter(dependencies=[Depends(declared_query_only)])

    @router.post("/switch")
    def switch(model_path: str | None = Query(None), require_better: bool = Query(False)) -> dict:
        return {"model_path": model_path, "require_better": require_better}

    @router.get("/list")
    def listing(limit: int = Depends(limit_param)) -> dict:
        return {"limit": limit}

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    return TestClient(app)


def test_declared_query_parameters_pass_and_others_are_named_in_a_400():
    http = client()
    assert http.post("/switch", params={"model_path": "m", "require_better": "true"}).json() == \
        {"model_path": "m", "require_better": True}
    typo = http.post("/switch", params={"model_path": "m", "require_beter": "true"})
    assert typo.status_code == 400, typo.text
    assert "require_beter" in typo.json()["error"]["message"]
    assert http.get("/list", params={"limit": 3}).json() == {"limit": 3}  # declared by a dependency
    assert http.get("/list", params={"limit": 3, "offset": 1}).status_code == 400
