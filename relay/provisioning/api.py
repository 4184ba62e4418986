"""Exchange Online's admin REST endpoint (what ExchangeOnlineManagement V3 uses underneath).

``POST {base}/adminapi/beta/{tenant}/InvokeCommand`` with ``{"CmdletInput": {"CmdletName": ...,
"Parameters": {...}}}``; app-only auth with a certificate through MSAL (scope
``<cloud resource>/.default``, app permission Exchange.ManageAsApp + an Exchange
admin role). Paging follows ``@odata.nextLink`` (POSTing the same body), 408/429/503/504 back off
(Retry-After, capped), a regional redirect is followed with the same POST only over https to an
Exchange Online host, and errors become sentences a person can act on.
"""

from __future__ import annotations

import functools
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ANCHOR_MAILBOX = "APP:SystemMailbox{{bb558c35-97f1-4cb9-8ff7-d53741dc928c}}@{tenant}"
# Answers worth the same request again (RFC 9110 §15.5.9 408, §15.6.4 503, §15.6.5 504; 429: RFC
# 6585 §4), honouring Retry-After up to a cap so a bad header cannot stall a run for hours.
RETRYABLE = {408: "request timeout", 429: "throttled", 503: "service unavailable", 504: "gateway timeout"}
MAX_RETRY_AFTER = 120.0
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class Cloud:
    """One Microsoft 365 cloud: admin API, sign-in authority and token scope belong together
    (Connect-ExchangeOnline -ExchangeEnvironmentName O365Default / O365USGovGCCHigh / O365USGovDoD /
    O365China; app-only-auth-powershell-v2; the "Office 365 U.S. Government DoD endpoints" page lists
    webmail.apps.mil). ``hosts``: where a regional redirect may lead (never the token elsewhere)."""

    name: str
    admin_url: str
    login_url: str
    resource: str
    hosts: tuple[str, ...]


CLOUDS = {
    "global": Cloud("global", "https://outlook.office365.com", "https://login.microsoftonline.com",
                    "https://outlook.office365.com", ("office365.com", "office.com", "outlook.com")),
    "gcc-high": Cloud("gcc-high", "https://outlook.office365.us", "https://login.microsoftonline.us",
                      "https://outlook.office365.us", ("office365.us",)),
    "dod": Cloud("dod", "https://webmail.apps.mil", "https://login.microsoftonline.us",
                 "https://webmail.apps.mil", ("webmail.apps.mil", "office365.us")),
    "china": Cloud("china", "https://partner.outlook.cn", "https://login.partner.microsoftonline.cn",
                   "https://partner.outlook.cn", ("partner.outlook.cn",)),
}


class ApiError(Exception):
    """A failure with a human explanation; ``exit_code`` tells the CLI what to return."""

    def __init__(self, message: str, *, status: int = 0, exit_code: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code


@dataclass
class Result:
    value: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def msal_token_provider(*, tenant_id: str, app_id: str, certificate: Path, login_base: str,
                        verify: str | bool = True, resource: str = CLOUDS["global"].resource) -> Callable[[], str]:
    """Bearer tokens for the admin API from an app registration's certificate (PEM: key + cert)."""
    import msal
    import requests

    pem = certificate.read_text("utf-8")
    key_start = pem.find("-----BEGIN PRIVATE KEY-----")
    cert_start = pem.find("-----BEGIN CERTIFICATE-----")
    if key_start < 0 or cert_start < 0:
        raise ApiError(f"{certificate}: needs the private key and the certificate (PEM), e.g. "
                       "`openssl pkcs12 -in app.pfx -out app.pem -nodes`", exit_code=2)
    custom = login_base.rstrip("/") != "https://login.microsoftonline.com"
    session = requests.Session()  # our own, so the trust anchors apply to discovery and token calls alike
    if verify is not True:
        # requests lets $REQUESTS_CA_BUNDLE override Session.verify (it wins over session settings);
        # an explicit --ca-bundle must win, so pass it on every request instead.
        session.request = functools.partial(session.request, verify=verify)  # type: ignore[method-assign]
    try:  # MSAL fetches the authority's OpenID configuration right here
        app = msal.ConfidentialClientApplication(
            app_id, authority=f"{login_base.rstrip('/')}/{tenant_id}",
            client_credential={"private_key": pem[key_start:pem.find("-----END PRIVATE KEY-----") + 25],
                               "public_certificate": pem[cert_start:pem.find("-----END CERTIFICATE-----") + 25]},
            http_client=session, instance_discovery=False if custom else None,
        )
    except (requests.RequestException, ValueError) as e:
        raise ApiError(f"Sign-in service {login_base} not reachable or not answering as expected: {e}",
                       exit_code=4) from e

    def token() -> str:
        try:
            res = app.acquire_token_for_client(scopes=[f"{resource}/.default"])
        except (requests.RequestException, ValueError) as e:
            raise ApiError(f"Sign-in service {login_base} not reachable or not answering as expected: {e}",
                           exit_code=4) from e
        if "access_token" not in res:
            desc = str(res.get("error_description", res.get("error", "unknown error"))).splitlines()[0]
            raise ApiError(f"Sign-in failed for app {app_id} in tenant {tenant_id}: {desc}. Check the app "
                           "registration's certificate and that admin consent was granted.", exit_code=3)
        return str(res["access_token"])

    return token


class AdminApi:
    def __init__(self, *, base_url: str, tenant: str, token: Callable[[], str], verify: str | bool = True,
                 max_retries: int = 5, log: Callable[[str], None] = lambda _m: None,
                 sleep: Callable[[float], None] = time.sleep, cloud: Cloud = CLOUDS["global"]) -> None:
        self.base = base_url.rstrip("/")
        self.cloud = cloud
        self.tenant = tenant
        self.token = token
        tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self.http = httpx.Client(verify=tls, timeout=60.0, follow_redirects=False)
        self.max_retries = max_retries
        self.log = log
        self.sleep = sleep
        self.calls: list[str] = []  # cmdlets invoked, for traces and tests

    def close(self) -> None:
        self.http.close()

    def invoke(self, cmdlet: str, params: dict[str, Any] | None = None) -> Result:
        self.calls.append(cmdlet)
        body = {"CmdletInput": {"CmdletName": cmdlet, "Parameters": params or {}}}
        url = f"{self.base}/adminapi/beta/{self.tenant}/InvokeCommand"
        out = Result([])
        while url:
            data = self._post(url, body, cmdlet)
            out.value += data.get("value", [])
            out.warnings += [str(w) for w in data.get("@adminapi.warnings", [])]
            url = data.get("@odata.nextLink") or ""
        return out

    def _post(self, url: str, body: dict[str, Any], cmdlet: str) -> dict[str, Any]:
        redirects, last = 0, 429
        for attempt in range(self.max_retries + 1):
            headers = {
                "Authorization": f"Bearer {self.token()}",
                "X-AnchorMailbox": ANCHOR_MAILBOX.format(tenant=self.tenant),
                "Prefer": "odata.maxpagesize=1000",
                "client-request-id": str(uuid.uuid4()),
                "Content-Type": "application/json",
            }
            try:
                r = self.http.post(url, json=body, headers=headers)
            except httpx.HTTPError as e:
                raise ApiError(f"{cmdlet}: cannot reach {url}: {e}", exit_code=4) from e
            if r.status_code in (301, 302, 307, 308) and "location" in r.headers:
                # The tenant lives in another region: the same POST goes to the regional endpoint.
                redirects += 1
                url = self._redirect_target(url, r.headers["location"], cmdlet, redirects)
                self.log(f"  … {cmdlet}: redirected to {httpx.URL(url).host}")
                continue
            if r.status_code in RETRYABLE:
                if attempt >= self.max_retries:
                    last = r.status_code
                    break
                wait = _retry_after(r, attempt)
                self.log(f"  … {cmdlet}: {RETRYABLE[r.status_code]} ({r.status_code}), retrying in {wait:.0f} s")
                self.sleep(wait)
                continue
            if r.status_code == 200:
                payload: dict[str, Any] = r.json()
                return payload
            raise _explain(r, cmdlet)
        what = "throttled" if last == 429 else f"answering {last} ({RETRYABLE.get(last, 'error')})"
        raise ApiError(f"{cmdlet}: still {what} after {self.max_retries} retries; try again later",
                       status=last, exit_code=5)

    def _redirect_target(self, url: str, location: str, cmdlet: str, redirects: int) -> str:
        """Where a redirect may go: https only, to this API's host or an Exchange Online host, at
        most ``MAX_REDIRECTS`` times — never the bearer token to anyone else."""
        if redirects > MAX_REDIRECTS:
            raise ApiError(f"{cmdlet}: Exchange Online redirected more than {MAX_REDIRECTS} times (a redirect loop); "
                           "check --admin-url", exit_code=4)
        target = httpx.URL(url).join(location)
        base_host = httpx.URL(self.base).host
        host_ok = target.host == base_host or any(target.host == s or target.host.endswith("." + s)
                                                  for s in self.cloud.hosts)
        if target.scheme != "https" or not host_ok:
            raise ApiError(f"{cmdlet}: refused to follow a redirect to {target.scheme}://{target.host} (only https to "
                           f"{base_host} or an Exchange Online host of the {self.cloud.name} cloud); the sign-in "
                           "token was not sent there", exit_code=4)
        return str(target)


def _retry_after(r: httpx.Response, attempt: int) -> float:
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(r.headers.get("retry-after", ""))))
    except ValueError:
        return min(60.0, 2.0 ** attempt)


def _explain(r: httpx.Response, cmdlet: str) -> ApiError:
    if r.status_code == 401:
        return ApiError(f"{cmdlet}: 401 Unauthorized — the token was not accepted. The app registration needs the "
                        "Office 365 Exchange Online application permission Exchange.ManageAsApp with admin consent, "
                        "and the certificate it signs in with must be uploaded to it.", status=401, exit_code=3)
    if r.status_code == 403:
        return ApiError(f"{cmdlet}: 403 Forbidden — the app signed in but may not run this cmdlet. Assign its service "
                        "principal the Exchange Administrator role (Entra ID → Roles and administrators).",
                        status=403, exit_code=3)
    ctype = r.headers.get("content-type", "")
    if "html" in ctype or r.text.lstrip()[:1] == "<":
        # A proxy, a captive portal or a gateway answered instead of the API: say so in one sentence.
        title = re.search(r"<title[^>]*>([^<]{1,200})</title>", r.text, re.I)
        page = f" ({' '.join(title.group(1).split())})" if title else ""
        return ApiError(f"{cmdlet}: {r.url.host} answered HTTP {r.status_code} with a web page{page} instead of the "
                        "admin API; check --admin-url and any proxy in between", status=r.status_code,
                        exit_code=4 if r.status_code >= 500 else 1)
    try:
        err = r.json().get("error", {})
    except ValueError:
        err = {}
    details = [d.get("message", "") for d in err.get("details", []) if isinstance(d, dict)]
    # Exchange packs "ExceptionCode|Exception.Type|human text" into details[].message.
    human = next((d.split("|")[-1].strip() for d in details if d), "") or err.get("message", "") or r.text[:200]
    code = err.get("code", "")
    return ApiError(f"{cmdlet}: Exchange Online refused ({r.status_code}{', ' + code if code else ''}): {human}",
                    status=r.status_code, exit_code=1)
