"""The mirror's refusals, in the Hub's own error shape (huggingface_hub maps them to its errors)."""

from __future__ import annotations

import json

from aiohttp import web


class HubError(Exception):
    """An answer in the Hub's own error shape: JSON `{"error": ...}` plus X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str = "", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        headers = {**self.headers, "X-Error-Message": header_safe(self.message)}
        if self.code:
            headers["X-Error-Code"] = self.code
        return web.json_response({"error": self.message}, status=self.status, headers=headers)


def header_safe(text: str) -> str:
    """Printable ASCII only: names from the request must not break (or inject) headers."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]


def relayed_error(status: int, headers, body: bytes) -> HubError:
    """Upstream's own 4xx, passed on as it came (message, code, X-Repo-Commit)."""
    message = headers.get("X-Error-Message", "")
    if not message:
        try:
            message = str(json.loads(body).get("error", ""))
        except (ValueError, AttributeError):
            message = ""
    extra = {"X-Repo-Commit": headers["X-Repo-Commit"]} if "X-Repo-Commit" in headers else {}
    return HubError(status, message or f"upstream answered {status}", headers.get("X-Error-Code", ""), extra)


def unsatisfiable(size: int, message: str) -> HubError:
    return HubError(416, message, headers={"Content-Range": f"bytes */{size}"})
