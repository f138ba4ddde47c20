"""What every request and answer body of the service shares; each job's own schemas live in its module
(``rnnlab/jobs/<name>.py``, named by the registry's ``request`` and ``answer``).

Every request body is a pydantic model with ``extra="forbid"`` (``StrictBody``): a misspelt field (``max_tokens``)
is a 422 naming it rather than a silently ignored option. Limits are constants of the job's module, so the
OpenAPI page at ``/docs`` states them and a violation is a 422 whose message quotes the limit (pydantic words
it: "at most 64 items").

A batched job's request has ``items()`` (what the service batches with concurrent requests' items) and
``error_loc(index)`` (where a bad item is, for the 422), and may set ``raw_json = True`` (a ClassVar) to be
validated from the raw JSON in one pydantic pass rather than by FastAPI (worth it for long bodies; pydantic's JSON
mode words a few messages differently: "valid array" for "valid list"); its answer has ``answer(model,
results)``, the JSON body built from the per-item results.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the fault is, e.g. ['body', 'texts', 3].")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem]
    request_id: str | None = Field(None, description="With a 500: the id of the server's log line about it.")


def error_item(loc: list[str | int], msg: str, kind: str = "value_error") -> dict:
    return {"loc": list(loc), "msg": msg, "type": kind}


def failure_message(request_id: str) -> str:
    """A generation that failed inside the service, in both the service's and OpenAI's shape."""
    return (f"Generation failed inside the service for request {request_id}; the server log has one line with "
            "this id. Other requests are not affected; retry, and report the id if it persists.")


MODEL_FIELD_DESCRIPTION = ("Model id to answer with (GET /v1/models lists them: each bundle's folder name); the job's "
                           "default model when left out.")


def with_model_field(request: type[BaseModel]) -> type[BaseModel]:
    """The job's request body plus ``model``: which of the job's served models answers (rnnlab/serve/versions.py).
    Added here, for every job's route at once; the job's own fields and checks are untouched."""
    from pydantic import create_model

    if "model" in request.model_fields:
        return request
    return create_model(request.__name__, __base__=request, __module__=request.__module__,
                        __doc__=request.__doc__,
                        model=(str | None, Field(None, min_length=1, max_length=200,
                                                 description=MODEL_FIELD_DESCRIPTION)))
