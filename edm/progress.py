"""The one progress bar of the project (sampling steps, generated images, training steps, studies)."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, unit: str, *, initial: int = 0, leave: bool = True):
    """A tqdm bar on stderr that adapts to the terminal's width."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
