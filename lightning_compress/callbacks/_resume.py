"""Checks on what a checkpoint restores into a callback: the same settings, the same ``state_key``.

A checkpoint written with other settings would be absorbed silently (a QAT model trained on an 8-bit grid resumed
on a 4-bit one), and one written under another ``state_key`` (another ``module``/``include``/``exclude``) would have
its state dropped with only Lightning's generic warning.
"""

from __future__ import annotations

from typing import Any


def check_same_settings(class_name: str, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume with other settings than the checkpoint's; the error names each change with both values.

    Keys absent from ``saved`` (a checkpoint from an older version) are not compared.
    """
    if not saved:
        return
    changed = [
        f"`{key}`: {saved[key]!r} in the checkpoint, {value!r} now"
        for key, value in current.items()
        if key in saved and _plain(saved[key]) != _plain(value)
    ]
    if changed:
        raise ValueError(
            f"{class_name} is resumed with other settings than the checkpoint was written with ("
            + "; ".join(changed)
            + "). Resume with the checkpoint's settings, or start a new fit (without `ckpt_path`)."
        )


def check_state_key(checkpoint: dict[str, Any], class_name: str, state_key: str, identified_by: str) -> None:
    """A checkpoint holding state of the same callback class under another ``state_key`` means that the arguments
    that identify it (``identified_by``, e.g. "`module`, `include` or `exclude`") changed: say so."""
    saved = checkpoint.get("callbacks", {})
    others = [key for key in saved if key.startswith(f"{class_name}{{") and key != state_key]
    if others and state_key not in saved:
        raise ValueError(
            f"The checkpoint holds {class_name} state for {others[0]}, but this callback is {state_key}:"
            f" {identified_by} changed, so the checkpoint's state would be dropped. Resume with the checkpoint's"
            " settings, or start a new fit without `ckpt_path`."
        )


def _plain(value: Any) -> Any:
    """Lists and tuples compare equal (a checkpoint may hold either)."""
    return list(value) if isinstance(value, tuple) else value
