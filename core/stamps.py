"""Time as people and file names read it: time-stamped ids (runs, cleaning batches) and durations."""

from __future__ import annotations

import math
import re
import secrets
import time


def stamped_id(hint: str = "") -> str:
    """A sortable, filesystem-safe id: UTC time to the second, a slug of `hint`, 4 random hex digits.

    e.g. "20261123-063012-resnet18-a1b2", or "20261123-063012-a1b2" without a hint. Ids sort by creation second;
    4 hex digits alone collide now and then when many are made in one second, so a caller that needs a unique
    name claims it atomically (mkdir) and draws again when it is taken.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:32].strip("-")
    return "-".join(part for part in (stamp, slug, secrets.token_hex(2)) if part)


def fmt_duration(seconds: float | None) -> str:
    """A duration as a clock reads: "4:05", "1:02:03" from an hour on; "–" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
