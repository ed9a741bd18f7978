"""Hot swap: ``POST /admin/reload {"model": DIR, "name": optional}`` with ``Authorization: Bearer <admin key>``.

The new model is loaded and its engine started in a worker thread while the old one keeps serving; then one
assignment on the event loop (``Server.served = new``) switches: requests that arrive afterwards run on the new
engine, requests in flight finish on the old one, which is stopped and let go once the last of them has closed
(served.retire). The answer (200) comes once switched: ``{"model", "checkpoint", "previous": {"model",
"checkpoint"}}``. A folder that does not load is a 400 and nothing changes; a reload while another is loading is a
409. `chatrlhf loop` calls exactly this after a promotion.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from chatrlhf.errors import UsageError
from chatrlhf.serve.completions import Server, server
from chatrlhf.serve.limits import admin_caller
from chatrlhf.serve.protocol import APIError
from chatrlhf.serve.served import Served, load_served, retire

log = logging.getLogger("chatrlhf.serve")
router = APIRouter()


def admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """The admin key or a 401/403 (a dependency: before the body is read)."""
    s = server(request)
    admin_caller(authorization, s.admin, s.digests)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=4096)        # what --model takes: a model folder, a .gguf, a name
    name: str = Field("", max_length=256)                    # the name in responses and the store; "" = model


@router.post("/admin/reload")
async def reload(body: ReloadRequest, request: Request, _admin: Annotated[None, Depends(admin)]):
    s = server(request)
    if s.reloading:
        s.metrics.reloads.labels("refused").inc()
        raise APIError(409, "a reload is already running: wait for its answer, then reload again if needed", None,
                       "reload_in_progress")
    s.reloading = True
    try:
        new = await asyncio.to_thread(load_served, s.cfg, body.model, body.name)
    except Exception as e:  # noqa: BLE001 - whatever stops the load, the old model serves on and the caller hears why
        s.metrics.reloads.labels("failed").inc()
        why = str(e) if isinstance(e, UsageError) else f"{type(e).__name__}: {e}"
        log.error("chatrlhf serve: reload of %s failed: %s", body.model, why)
        raise APIError(400, f"cannot load {body.model} ({why}); nothing changed: still serving "
                       f"'{s.served.name}'", "model", "invalid_model") from None
    finally:
        s.reloading = False
    old, s.served = s.served, new   # the switch: one assignment on the event loop
    s.metrics.reloads.labels("swapped").inc()
    asyncio.ensure_future(swap_out(s, old))
    log.warning("chatrlhf serve: now serving %s (%s); %s stops after its last request", new.name, new.checkpoint,
                old.name)
    return {"object": "reload", "model": new.name, "checkpoint": new.checkpoint,
            "previous": {"model": old.name, "checkpoint": old.checkpoint}}


async def swap_out(s: Server, old: Served) -> None:
    """``old`` counted among the running engines until its last request has finished and it is stopped."""
    s.retiring.add(old)
    try:
        await retire(old)
    except Exception as e:  # noqa: BLE001 - a background task: log, never lose the error silently
        log.error("chatrlhf serve: stopping %s failed: %s: %s", old.name, type(e).__name__, e)
    finally:
        s.retiring.discard(old)
