"""Following ``page_token`` / ``next_page_token`` (AIP-158) for the list methods.

A namespace hands over how to fetch one page (given its token and size) and where the items
of a page are; these generators fetch pages only as the iteration needs them and stop after
``limit`` items when one is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")
P = TypeVar("P", bound="Page")


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


def size_for(page_size: int | None, limit: int | None) -> int | None:
    # No point fetching a page bigger than what the caller will read.
    if limit is None:
        return page_size
    return min(page_size, limit) if page_size else limit


async def apaginate(
    fetch: Callable[[str, int | None], Awaitable[P]],
    items: Callable[[P], Sequence[T]],
    *,
    page_size: int | None = None,
    limit: int | None = None,
) -> AsyncIterator[T]:
    """Every item of every page; ``fetch(token, size)`` returns one page."""
    token, seen = "", 0
    size = size_for(page_size, limit)
    while limit is None or seen < limit:
        page = await fetch(token, size)
        for item in items(page)[: None if limit is None else limit - seen]:
            seen += 1
            yield item
        token = page.next_page_token
        if not token:
            return


def paginate(
    fetch: Callable[[str, int | None], P],
    items: Callable[[P], Sequence[T]],
    *,
    page_size: int | None = None,
    limit: int | None = None,
) -> Iterator[T]:
    """The blocking twin of :func:`apaginate`."""
    token, seen = "", 0
    size = size_for(page_size, limit)
    while limit is None or seen < limit:
        page = fetch(token, size)
        for item in items(page)[: None if limit is None else limit - seen]:
            seen += 1
            yield item
        token = page.next_page_token
        if not token:
            return
