"""The two retained messages of a pull rollout, as typed models (JSON Schemas in ``schemas/``).

``<prefix>/<device_id>/desired`` (:class:`Desired`), written by ``doorstep-host rollout``: the
bundle this device should run. ``<prefix>/<device_id>/update`` (:class:`UpdateReport`),
written by the device: where it is with that bundle. Both are retained, QoS 1, so a device that
was offline, a broker that restarted or a rollout process that was killed all pick up where
things stand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ID = r"^[0-9a-f]{64}$"
UpdateState = Literal["downloading", "installing", "serving", "rolled_back", "failed"]


class Desired(BaseModel):
    """The bundle a rollout wants on this device."""

    model_config = ConfigDict(title="doorstep desired bundle", extra="forbid", frozen=True)

    rollout_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the rollout's name")
    bundle_id: str = Field(pattern=ID, description="the bundle's content id (manifest sha256)")
    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://")
    sha256: str = Field(pattern=ID, description="sha256 of the tar at the URL")
    size: int = Field(gt=0, le=2**40, description="bytes of the tar at the URL")
    name: str = Field(max_length=128)
    version: str = Field(max_length=64)
    health_deadline_s: float = Field(
        120, ge=1, le=86_400, description="seconds the new model has to be serving after the switch"
    )
    allow_downgrade: bool = Field(
        False, description="allow a version older than the one serving (a rollback rollout)"
    )
    issued: float = Field(ge=0, description="Unix time the rollout wrote this")


class UpdateReport(BaseModel):
    """What the device did with its desired bundle."""

    model_config = ConfigDict(title="doorstep update report", extra="forbid", frozen=True)

    device_id: str
    rollout_id: str | None = Field(description="the desired message this answers")
    bundle_id: str | None = Field(description="the desired bundle this answers")
    state: UpdateState
    bytes: int = Field(0, ge=0, description="bytes downloaded so far")
    size: int = Field(0, ge=0, description="bytes of the tar")
    reason: str | None = Field(None, max_length=2000, description="why it failed or rolled back")
    active_id: str | None = Field(description="the bundle serving now (null: the shipped model)")
    active_version: str | None = None
    time: float = Field(ge=0, description="Unix time of this report")
