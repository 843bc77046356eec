"""Page tokens of listings ordered by (score, member): the position after the last item and a
hash of the query, so a token is refused for another query instead of paging wrongly."""

from __future__ import annotations

import base64
import hashlib
import json

from cordum.server.errors import invalid_field


def query_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:12]


def encode_token(position: tuple[float, str], query: str) -> str:
    raw = json.dumps({"s": position[0], "m": position[1], "q": query_hash(query)})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_token(token: str, query: str) -> tuple[float, str] | None:
    """The position a token points after; None for no token (the first page)."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        position = (float(raw["s"]), str(raw["m"]))
        same_query = raw["q"] == query_hash(query)
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid_field("page_token", "malformed page token") from exc
    if not same_query:
        raise invalid_field("page_token", "the token belongs to a different query")
    return position
