"""A client of the daemon's control API (/v1): one call, its JSON answer or an ApiError.

The CLI and the CSI driver both talk to the daemon this way; each turns an
ApiError into its own kind of failure (a one-line message, a CSI status code).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable


class ApiError(Exception):
    """The daemon answered an error (`status`), or could not be reached (`status` None)."""

    def __init__(self, status: int | None, detail: str, cause: Exception | None = None):
        super().__init__(detail)
        self.status, self.detail, self.cause = status, detail, cause


def call(
    base_url: str,
    method: str,
    path: str,
    body: dict | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    opener: Callable = urllib.request.urlopen,
) -> dict:
    """One request with a JSON body (or none) and `Authorization: Bearer <token>` when given."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data=data, headers=headers, method=method)
    try:
        with opener(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", e.reason)
        except (ValueError, OSError):
            detail = e.reason
        raise ApiError(e.code, str(detail)) from None
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: an answer that is not JSON
        raise ApiError(None, str(getattr(e, "reason", e)), e) from None
