"""A local HTTPS emulator of Exchange Online's admin REST API and of the Entra ID token endpoint.

It follows the documented shapes (``shared/reference/exchange-online.md``): InvokeCommand with
``{"CmdletInput": {"CmdletName", "Parameters"}}``, bearer token + ``X-AnchorMailbox`` required,
``{"value": [...], "@adminapi.warnings": [...]}`` answers, ``@odata.nextLink`` paging, error bodies
``{"error": {"code", "message", "details": [{"message": "Ex..|Type|text"}]}}``. It keeps connector and
rule state, verifies the client-assertion JWT MSAL signs with the app's certificate, and can inject
429, 302 (regional redirect), 401, 403 and error bodies.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

ANCHOR = "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@"
PARAMS = {
    "InboundConnector": {"Name", "ConnectorType", "SenderDomains", "TlsSenderCertificateName", "RequireTls",
                         "RestrictDomainsToCertificate", "CloudServicesMailEnabled", "Enabled", "Comment"},
    "OutboundConnector": {"Name", "ConnectorType", "IsTransportRuleScoped", "UseMXRecord", "SmartHosts",
                          "TlsSettings", "TlsDomain", "CloudServicesMailEnabled", "RouteAllMessagesViaOnPremises",
                          "Enabled", "IsValidated", "LastValidationTimestamp", "ValidationRecipients", "Comment"},
    "TransportRule": {"Name", "FromScope", "FromMemberOf", "SentToScope", "RouteMessageOutboundConnector",
                      "ExceptIfHeaderMatchesMessageHeader", "ExceptIfHeaderMatchesPatterns",
                      "ExceptIfMessageTypeMatches", "ExceptIfFromAddressMatchesPatterns", "ExceptIfMessageSizeOver",
                      "SenderAddressLocation", "RuleErrorAction", "StopRuleProcessing", "Priority", "Mode",
                      "MessageTypeMatches", "HeaderMatchesMessageHeader", "HeaderMatchesPatterns", "SetHeaderName",
                      "SetHeaderValue", "SubjectMatchesPatterns"},
}


@dataclass
class ExoState:
    tenant_id: str
    app_id: str
    app_cert: x509.Certificate
    accepted_domains: list[str]
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    inject: list[str] = field(default_factory=list)  # "429", "302", "401", "403", "error"
    page_size: int = 2
    token_requests: int = 0
    base: str = ""
    validation_fails: bool = False  # Validate-OutboundConnector: the TLS task fails
    scopes: list[str] = field(default_factory=list)  # the scope of each token request

    def mutations(self) -> list[str]:
        return [c for c, _ in self.calls if not c.startswith("Get-")]


def client_credentials(f: dict[str, str], app_id: str, app_cert: x509.Certificate, audience: str,
                       scopes: tuple[str, ...], tokens: set[str]) -> tuple[int, dict[str, Any]]:
    """Entra ID's token endpoint for an app signing in with its certificate (client credentials
    with a client assertion JWT, as MSAL sends it): (200, a new bearer token, also added to
    ``tokens``) or (401, ``invalid_client``)."""
    try:
        assert f.get("grant_type") == "client_credentials"
        assert f.get("client_id") == app_id
        assert f.get("scope") in scopes, f.get("scope")
        assert f.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        key = app_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)  # the app's certificate is RSA (what Entra ID requires)
        claims = jwt.decode(f["client_assertion"], key, algorithms=["RS256", "PS256"], audience=audience)
        assert claims["iss"] == claims["sub"] == app_id
    except (AssertionError, KeyError, jwt.PyJWTError) as e:
        return 401, {"error": "invalid_client", "error_description": f"AADSTS700027: bad client assertion ({e})"}
    token = secrets.token_urlsafe(24)
    tokens.add(token)
    return 200, {"token_type": "Bearer", "expires_in": 3599, "access_token": token}


def _error(code: str, text: str, exc: str = "Microsoft.Exchange.Management.Tasks.TaskException") -> dict[str, Any]:
    return {"error": {"code": code, "message": "An error occurred.",
                      "details": [{"message": f"Ex6F9304|{exc}|{text}"}]}}


class _Handler(BaseHTTPRequestHandler):
    state: ExoState

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        st = self.state
        if self.path.endswith("/.well-known/openid-configuration"):
            t = st.tenant_id
            self._send(200, {
                "token_endpoint": f"{st.base}/{t}/oauth2/v2.0/token",
                "authorization_endpoint": f"{st.base}/{t}/oauth2/v2.0/authorize",
                "issuer": f"{st.base}/{t}/v2.0",
                "device_authorization_endpoint": f"{st.base}/{t}/oauth2/v2.0/devicecode",
            })
            return
        self._send(404, _error("NotFound", "no such path"))

    def do_POST(self) -> None:
        st = self.state
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        path = urllib.parse.urlsplit(self.path)
        if path.path.endswith("/oauth2/v2.0/token"):
            self._token(urllib.parse.parse_qs(raw.decode()))
            return
        if not path.path.endswith(f"/adminapi/beta/{st.tenant_id}/InvokeCommand"):
            self._send(404, _error("NotFound", f"no such endpoint {path.path}"))
            return
        if st.inject:
            what = st.inject.pop(0)
            if what == "429":
                self._send(429, _error("TooManyRequests", "Too many requests"), {"Retry-After": "0"})
                return
            if what == "302":
                self._send(302, {}, {"Location": f"{st.base}/emea/adminapi/beta/{st.tenant_id}/InvokeCommand"})
                return
            if what in ("503", "504", "408"):
                self._send(int(what), _error("ServiceUnavailable", "try later"), {"Retry-After": "0"})
                return
            if what == "302-loop":
                st.inject[:0] = ["302-loop"]  # every request is redirected again
                self._send(302, {}, {"Location": f"{st.base}/loop/adminapi/beta/{st.tenant_id}/InvokeCommand"})
                return
            if what == "302-http":
                self._send(302, {}, {"Location": f"http://127.0.0.1:1/adminapi/beta/{st.tenant_id}/InvokeCommand"})
                return
            if what == "302-foreign":
                self._send(302, {}, {"Location": f"https://attacker.example/adminapi/beta/{st.tenant_id}/InvokeCommand"})
                return
            if what == "html":
                page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
                self.send_response(502)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            if what == "401":
                self._send(401, {}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                return
            if what == "403":
                self._send(403, _error("Forbidden",
                                       "The role assigned to application isn't supported in this scenario"))
                return
            if what == "error":
                self._send(400, _error("BadRequest", "The connector couldn't be saved because TlsDomain is invalid.",
                                       "Microsoft.Exchange.Management.Tasks.InvalidTlsDomainException"))
                return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in st.tokens:
            self._send(401, {}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return
        if self.headers.get("X-AnchorMailbox") != ANCHOR + st.tenant_id:
            self._send(400, _error("BadRequest", "X-AnchorMailbox header missing or wrong"))
            return
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            self._send(415, _error("UnsupportedMediaType", "JSON body expected"))
            return
        try:
            body = json.loads(raw)
            cmd = body["CmdletInput"]["CmdletName"]
            params = body["CmdletInput"].get("Parameters", {})
            assert isinstance(cmd, str) and isinstance(params, dict)
        except (ValueError, KeyError, AssertionError):
            self._send(400, _error("BadRequest",
                                   'Request body must be {"CmdletInput": {"CmdletName", "Parameters"}}'))
            return
        st.calls.append((cmd, params))
        skip = int(urllib.parse.parse_qs(path.query).get("$skiptoken", ["0"])[0])
        status, out = self._cmdlet(cmd, params, skip)
        self._send(status, out)

    def _token(self, form: dict[str, list[str]]) -> None:
        st = self.state
        st.token_requests += 1
        f = {k: v[0] for k, v in form.items()}
        st.scopes.append(f.get("scope", ""))
        # the resource of one of the clouds (app-only-auth-powershell-v2; see relay.provisioning.api.CLOUDS)
        self._send(*client_credentials(f, st.app_id, st.app_cert, f"{st.base}/{st.tenant_id}/oauth2/v2.0/token",
                                       ("https://outlook.office365.com/.default",
                                        "https://outlook.office365.us/.default", "https://webmail.apps.mil/.default",
                                        "https://partner.outlook.cn/.default"), st.tokens))

    def _rule_state(self, verb: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Enable-/Disable-TransportRule -Identity [-Mode] (learn.microsoft.com/powershell/module/
        exchange/enable-transportrule, .../disable-transportrule): they set the rule's State."""
        name = str(params.get("Identity", ""))
        rule = self.state.objects.get(("TransportRule", name.lower()))
        if rule is None:
            return 404, _error("NotFound", f"The operation couldn't be performed because object '{name}' couldn't "
                               "be found.", "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException")
        rule["State"] = "Enabled" if verb == "Enable" else "Disabled"
        if verb == "Enable" and "Mode" in params:
            rule["Mode"] = params["Mode"]
        return 200, {"value": []}

    def _cmdlet(self, cmd: str, params: dict[str, Any], skip: int) -> tuple[int, dict[str, Any]]:
        st = self.state
        verb, _, noun = cmd.partition("-")
        if cmd == "Get-AcceptedDomain":
            doms = [{"DomainName": d, "Name": d, "DomainType": "Authoritative"} for d in st.accepted_domains]
            page = doms[skip:skip + st.page_size]
            out: dict[str, Any] = {"value": page}
            if skip + st.page_size < len(doms):
                out["@odata.nextLink"] = (f"{st.base}/adminapi/beta/{st.tenant_id}/InvokeCommand"
                                          f"?$skiptoken={skip + st.page_size}")
            return 200, out
        if noun not in PARAMS:
            return 400, _error("BadRequest", f"The term '{cmd}' is not recognized as a cmdlet")
        if verb in ("Enable", "Disable") and noun == "TransportRule":
            return self._rule_state(verb, params)
        allowed = PARAMS[noun] | ({"Identity"} if verb in ("Get", "Set", "Remove", "Validate") else set()) | \
            ({"Confirm"} if verb == "Remove" else set()) | ({"Recipients"} if verb == "Validate" else set()) | \
            ({"Enabled"} if (verb, noun) == ("New", "TransportRule") else set())
        unknown = sorted(set(params) - allowed) if verb != "Get" else sorted(set(params) - {"Identity"})
        if unknown:
            return 400, _error("BadRequest", f"A parameter cannot be found that matches parameter name '{unknown[0]}'.",
                               "System.Management.Automation.ParameterBindingException")
        name = str(params.get("Identity" if verb != "New" else "Name", ""))
        key = (noun, name.lower())
        missing = _error("NotFound", f"The operation couldn't be performed because object '{name}' couldn't be found "
                         f"on 'AM0PR01A001DC01.EURPR01A001.prod.outlook.com'.",
                         "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException")
        if verb == "Get":
            if not name:
                return 200, {"value": [_readback(o) for (n, _), o in st.objects.items() if n == noun]}
            return (200, {"value": [_readback(st.objects[key])]}) if key in st.objects else (404, missing)
        if verb == "New":
            if not name:
                return 400, _error("BadRequest", "Name is required")
            if key in st.objects:
                return 400, _error("BadRequest", f"An object named '{name}' already exists.")
            if noun == "OutboundConnector":
                params = {"IsValidated": False, **params}
            if noun == "TransportRule":
                # Get-TransportRule shows State (Enabled/Disabled), not the New- switch -Enabled
                # (learn.microsoft.com/powershell/module/exchange/new-transportrule, -Enabled).
                enabled = params.pop("Enabled", True)
                params = {**params, "State": "Enabled" if enabled else "Disabled"}
            st.objects[key] = dict(params)
            warn = ["The transport rule may take up to 30 minutes to take effect."] if noun == "TransportRule" else []
            return 200, {"value": [st.objects[key]], "@adminapi.warnings": warn}
        if key not in st.objects:
            return 404, missing
        if verb == "Set":
            st.objects[key].update({k: v for k, v in params.items() if k != "Identity"})
            return 200, {"value": []}
        if verb == "Remove":
            if noun == "OutboundConnector" and any(o.get("RouteMessageOutboundConnector", "").lower() == name.lower()
                                                   for (n, _), o in st.objects.items() if n == "TransportRule"):
                return 400, _error("BadRequest", f"Connector '{name}' is used by a transport rule.")
            del st.objects[key]
            return 200, {"value": []}
        if verb == "Validate" and noun == "OutboundConnector":
            # Per-task results (TaskName, IsTaskSuccessful, details): the shape of the cmdlet's
            # output objects (learn.microsoft.com/powershell/module/exchange/validate-outboundconnector;
            # shared/reference/exchange-online.md); there is no "Status" field.
            tls_ok = not st.validation_fails
            tasks = [
                {"TaskName": "Resolve smart host", "IsTaskSuccessful": True, "Details": None},
                {"TaskName": "Establish TLS connection", "IsTaskSuccessful": tls_ok,
                 "Details": None if tls_ok else "TLS with the smart host failed (emulated failure)"},
                {"TaskName": "Send test email", "IsTaskSuccessful": tls_ok,
                 "Details": None if tls_ok else "Skipped: an earlier task failed"},
            ]
            return 200, {"value": [{**t, "Identity": name, "Recipients": params.get("Recipients")} for t in tasks]}
        return 400, _error("BadRequest", f"The term '{cmd}' is not recognized as a cmdlet")


def _size(n: int) -> str:
    """A ByteQuantifiedSize as Exchange prints it: "22.5 MB (23,592,960 bytes)"."""
    for unit, f in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= f:
            return f"{n / f:.4g} {unit} ({n:,} bytes)"
    return f"{n} B ({n:,} bytes)"


def _readback(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as Get-* shows it, not as Set-* took it: SenderDomains as address spaces
    ("smtp:*;1", Get-InboundConnector), sizes as ByteQuantifiedSize strings (Get-TransportRule's
    ExceptIfMessageSizeOver), TlsDomain as a plain string, SmartHosts as a collection."""
    out = dict(obj)
    if isinstance(out.get("SenderDomains"), list):
        out["SenderDomains"] = [f"smtp:{d};1" for d in out["SenderDomains"]]
    if isinstance(out.get("ExceptIfMessageSizeOver"), int):
        out["ExceptIfMessageSizeOver"] = _size(out["ExceptIfMessageSizeOver"])
    if isinstance(out.get("SmartHosts"), str):
        out["SmartHosts"] = [out["SmartHosts"]]
    return out


class TlsServer:
    """An HTTPS server on a free loopback port for one handler class and its ``state`` (whose
    ``base`` gets the server's URL); a context manager that runs it in a thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], state: Any, cert: Path, key: Path) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (handler,), {"state": state}))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        state.base = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Emulator(TlsServer):
    def __init__(self, state: ExoState, cert: Path, key: Path) -> None:
        super().__init__(_Handler, state, cert, key)
        self.state = state

    def __enter__(self) -> Emulator:
        super().__enter__()
        return self
