"""JSON routes the web page adds to the hub API, behind the API key like the rest of ``/v1``.

* ``POST /v1/reviews {ref, n, seed}``: start a blinded A/B round in the browser
  (``evals.review.create_review``); the answer holds the rows as A/B only.
* ``GET /v1/reviews/{id}``: a round's blinded rows again, its status and result.
* ``POST /v1/reviews/{id}/ratings {ratings: [{row_id, rating[, comment]}]}``: the
  whole round's ratings, checked and un-blinded exactly like a CSV sheet's import
  (``evals.review.record_ratings``).
* ``GET /v1/adapters/{ref}/files``: each stored file of a version with its sha256
  and size in bytes (the catalog keeps the hashes; the sizes come from the store).
"""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from loradex.serving.deps import get_state
from loradex.serving.hub_routes import _json, _run


class ReviewCreateRequest(BaseModel):
    ref: str = Field(description="NAME[@VERSION|@ALIAS]: the version whose latest eval outputs are reviewed")
    n: int = Field(20, description="rows to draw (at most the eval run's items)")
    seed: Optional[int] = Field(None, description="seed for drawing rows and A/B order (random when absent)")


class Rating(BaseModel):
    row_id: str
    rating: Optional[int | str] = Field(None, description="1 A much better .. 3 same .. 5 B much better")
    comment: Optional[str] = None


class RatingsRequest(BaseModel):
    ratings: list[Rating]


router = APIRouter(prefix="/v1", tags=["web"])


@router.post("/reviews", status_code=201, summary="Start a blinded A/B review round in the browser (no file)")
async def create_review(body: ReviewCreateRequest, state=Depends(get_state)):
    from loradex.evals.review import create_review as fn

    return _json(await _run(fn, state.catalog, body.ref, n=body.n, seed=body.seed), 201)


@router.get("/reviews/{review_id}", summary="A review round's blinded rows, status and result")
async def review_sheet(review_id: int, state=Depends(get_state)):
    from loradex.evals.review import review_sheet as fn

    return _json(await _run(fn, state.catalog, review_id))


@router.post("/reviews/{review_id}/ratings", summary="Rate a whole round (same checks as a sheet's import)")
async def record_ratings(review_id: int, body: RatingsRequest, state=Depends(get_state)):
    from loradex.evals.review import record_ratings as fn

    ratings = [r.model_dump(exclude_none=True) for r in body.ratings]
    return _json(await _run(fn, state.catalog, review_id, ratings))


@router.get("/adapters/{ref}/files", summary="A version's stored files with sha256 and size")
async def files(ref: str, state=Depends(get_state)):
    return _json(await _run(file_sizes, state.catalog, state.store, ref))


def file_sizes(catalog, store, ref: str) -> dict:
    """{adapter, version, digest, files: [{file, sha256, size_bytes}]} of the version ``ref`` names."""
    from loradex.hub.registry import resolve

    row = resolve(catalog, ref)
    files = []
    for name, sha in sorted((row["files"] or {}).items()):
        path = store.object_path(sha)
        files.append({"file": name, "sha256": sha, "size_bytes": path.stat().st_size if path.is_file() else None})
    return {"adapter": row["adapter"], "version": row["version"], "digest": row["digest"], "files": files}
