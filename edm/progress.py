"""The one progress bar of the project (sampling steps, generated images, training steps, studies, scoring)."""

from __future__ import annotations

from typing import Iterable, Iterator, Sized

__all__ = ["progress_bar", "counted_batches"]


def progress_bar(total: int | None, desc: str, unit: str, *, initial: int = 0, leave: bool = True):
    """A tqdm bar on stderr that adapts to the terminal's width (total None: a count and a rate, no end)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)


def counted_batches(batches: Iterable[Sized], desc: str, *, total: int | None = None, enabled: bool = True,
                    unit: str = "img") -> Iterator:
    """The batches unchanged, their items counted on a progress_bar (`total` items, if known) when `enabled`; the
    bar closes when the batches end or the caller stops early."""
    if not enabled:
        yield from batches
        return
    bar = progress_bar(total, desc, unit, leave=False)
    try:
        for batch in batches:
            yield batch
            bar.update(len(batch))
    finally:
        bar.close()
