"""Copies of the hub ``config.json`` of the models that effine ships a config for (configs/), for offline use.

The memory planner (``effine plan``, ``effine config list``) needs only a model's architecture. For a hub id it
reads, in order: a snapshot an earlier run downloaded, then the copy here, then the hub. The copy makes the plan
the same on every machine, online or not (the quoted numbers in each config's header are tested against it), and
lets the tests build a tiny random model of exactly that architecture (:func:`effine.model.tiny.shrink_hub_config`).

    org--name/config.json     the hub config.json of ``org/name`` (architecture keys; weights are not needed)

The values were written from the public configs; see the README's family table for what was checked.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).parent


def shipped_config_dir(hub_id: str) -> Path | None:
    """The directory holding effine's copy of ``hub_id``'s config.json, or None when effine ships none."""
    if hub_id.count("/") != 1:
        return None
    d = SHIPPED_DIR / hub_id.replace("/", "--")
    return d if (d / "config.json").is_file() else None


def shipped_hub_ids() -> list[str]:
    """Every hub id with a shipped config.json, sorted."""
    return sorted(p.parent.name.replace("--", "/", 1) for p in SHIPPED_DIR.glob("*/config.json"))
