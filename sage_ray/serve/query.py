"""Query parameters: a route answers 400 naming any it does not implement, since FastAPI would
otherwise ignore them and the caller would never learn that `?require_beter=1` did nothing."""

from __future__ import annotations

from fastapi import Request

from sage_ray.serve.service import ServiceError


def only_query(request: Request, *allowed: str) -> None:
    """A 400 naming any query parameter of `request` not in `allowed`."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        raise ServiceError(400, f"{', '.join(unknown)}: not supported by this server; leave it out",
                           {"param": unknown[0]})


def declared_query_only(request: Request) -> None:
    """A router dependency: each route takes the query parameters it declares, and no others."""
    route = request.scope.get("route")
    only_query(request, *(_query_names(route.dependant) if route else ()))


def _query_names(dependant) -> set[str]:
    """The query parameters a route's function and its dependencies declare (FastAPI's Dependant)."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
