"""Microsoft Graph, read-only, for the directory sync (``relay/dirsync.py``).

App-only auth with the app registration's certificate through MSAL, as provisioning does (scope
``<graph>/.default``). Paging follows ``@odata.nextLink`` until ``@odata.deltaLink`` (learn.
microsoft.com/graph/delta-query-overview), only to the Graph host of the selected cloud (the
token never goes anywhere else); 429/503/504 are retried honouring ``Retry-After`` up to a cap
(learn.microsoft.com/graph/throttling); 401/403 become a sentence naming the fix; an expired or
invalid delta link (410 Gone, or 400 ``syncStateNotFound``, the code Microsoft documents for
identity resources) raises :class:`ResyncRequired`.
"""

from __future__ import annotations

import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from relay.provisioning.api import MAX_RETRY_AFTER, ApiError, _retry_after

GRAPH_URLS = {  # learn.microsoft.com/graph/deployments: the Graph endpoint of each national cloud
    "global": "https://graph.microsoft.com",
    "gcc-high": "https://graph.microsoft.us",
    "dod": "https://dod-graph.microsoft.us",
    "china": "https://microsoftgraph.chinacloudapi.cn",
}
RETRYABLE = {429: "throttled", 503: "service unavailable", 504: "gateway timeout"}
RESYNC_CODES = {"syncStateNotFound", "resyncRequired", "syncStateInvalid"}
PERMISSIONS = "User.Read.All and GroupMember.Read.All (ProfilePhoto.Read.All for photos)"


class ResyncRequired(Exception):
    """The delta link is no longer valid: start a full synchronisation."""


@dataclass
class Page:
    value: list[dict[str, Any]]
    next_link: str | None
    delta_link: str | None


class Graph:
    def __init__(self, *, base_url: str, token: Callable[[], str], verify: str | bool = True,
                 max_retries: int = 6, log: Callable[[str], None] = lambda _m: None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base = base_url.rstrip("/")
        self.host = urllib.parse.urlsplit(self.base).netloc.lower()
        self.token, self.log, self.sleep, self.max_retries = token, log, sleep, max_retries
        tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self.http = httpx.Client(verify=tls, timeout=httpx.Timeout(60.0), follow_redirects=False)
        self.requests = 0

    def close(self) -> None:
        self.http.close()

    def _url(self, path_or_url: str) -> str:
        url = path_or_url if path_or_url.startswith("https://") else f"{self.base}/v1.0/{path_or_url.lstrip('/')}"
        if urllib.parse.urlsplit(url).netloc.lower() != self.host:
            raise ApiError(f"Microsoft Graph sent a link to another host ({urllib.parse.urlsplit(url).netloc}); "
                           "refusing to send the token there", exit_code=4)
        return url

    def get(self, path_or_url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """One GET with retries; 2xx, 304 and 404 are returned, anything else raises."""
        url = self._url(path_or_url)
        for attempt in range(self.max_retries + 1):
            try:
                r = self.http.get(url, headers={"Authorization": f"Bearer {self.token()}", **(headers or {})})
            except httpx.HTTPError as e:
                raise ApiError(f"Microsoft Graph ({self.host}) not reachable: {e}", exit_code=4) from e
            self.requests += 1
            if r.status_code in RETRYABLE and attempt < self.max_retries:
                wait = _retry_after(r, attempt)
                self.log(f"Microsoft Graph: {RETRYABLE[r.status_code]} ({r.status_code}), retrying in {wait:.0f} s")
                self.sleep(min(wait, MAX_RETRY_AFTER))
                continue
            return self._check(r)
        raise AssertionError("unreachable")

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.is_success or r.status_code in (304, 404):
            return r
        code, message = _error(r)
        if r.status_code == 410 or code in RESYNC_CODES:
            raise ResyncRequired(f"{r.status_code} {code}: {message}")
        if r.status_code == 401:
            raise ApiError(f"Microsoft Graph refused the sign-in token (401 {code}): check the app registration's "
                           "certificate and that it belongs to this tenant", status=401, exit_code=3)
        if r.status_code == 403:
            raise ApiError(f"Microsoft Graph refused access (403 {code}: {message}). Give the app registration the "
                           f"application permissions {PERMISSIONS}, and grant admin consent", status=403, exit_code=3)
        if r.status_code in RETRYABLE:
            raise ApiError(f"Microsoft Graph is still {RETRYABLE[r.status_code]} after {self.max_retries} retries; "
                           "try again later", status=r.status_code, exit_code=5)
        raise ApiError(f"Microsoft Graph answered {r.status_code} {code}: {message}", status=r.status_code)

    def page(self, path_or_url: str) -> Page:
        r = self.get(path_or_url)
        if r.status_code == 404:
            code, message = _error(r)
            raise ApiError(f"Microsoft Graph answered 404 {code}: {message}", status=404)
        body = r.json()
        return Page(list(body.get("value", [])), body.get("@odata.nextLink"), body.get("@odata.deltaLink"))

    def delta(self, start: str) -> Iterator[Page]:
        """Every page of one delta round, from ``start`` (a path or a stored delta link)."""
        link: str | None = start
        while link:
            p = self.page(link)
            yield p
            if p.delta_link:
                return
            link = p.next_link
        raise ApiError("Microsoft Graph ended a delta round without @odata.deltaLink")


def _error(r: httpx.Response) -> tuple[str, str]:
    """Graph's error body: {"error": {"code", "message"}} (learn.microsoft.com/graph/errors)."""
    try:
        err = r.json().get("error", {})
        return str(err.get("code", "")), str(err.get("message", "")).splitlines()[0] if err.get("message") else ""
    except ValueError:
        text = r.text.strip().splitlines()
        return "", text[0][:200] if text else ""
