"""Named SMTP replies and the ONE place where exceptions become replies.

Codes follow RFC 5321 §4.2 and the enhanced status codes of RFC 3463 / RFC 5248.
"""

from __future__ import annotations

import logging

from relay.errors import RelayError, Reply

log = logging.getLogger("relay.smtp")

# --- success -------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")

# --- transient (4xx): Exchange Online keeps the message and retries for ~24 h ----------------
LOCAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, please try again later")
TENANT_LOOKUP_FAILED = Reply(451, "4.7.1", "Unable to verify the sending organization now, try again later")
ENDPOINT_UNAVAILABLE = Reply(451, "4.4.1", "Tenant inbound endpoint not reachable, try again later")
ENDPOINT_TLS_FAILED = Reply(451, "4.7.5", "Secure connection to tenant endpoint failed, try again later")
ENDPOINT_DNS_FAILED = Reply(451, "4.4.3", "Tenant endpoint lookup failed, try again later")
ENDPOINT_TIMEOUT = Reply(451, "4.4.2", "Tenant endpoint timed out, try again later")
ENDPOINT_DEFERRED = Reply(451, "4.4.0", "Tenant endpoint deferred the message, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
# aiosmtpd would say "500 Line too long" (RFC 5321 §4.5.3.1.6) after DATA; Exchange Online may have
# accepted the message already, so a bounce would lose it for a limit the operator can raise.
DATA_LINE_TOO_LONG = Reply(451, "4.6.0", "Line too long for this relay, try again later")
QUEUE_WRITE_FAILED = Reply(451, "4.3.0", "Cannot queue the message now, try again later")
# RFC 3463 §3.4: X.3.1 "mail system full"; 452 is "insufficient system storage" (RFC 5321 §4.2.3).
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")

# --- permanent (5xx) ----------------------------------------------------------------------------
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")  # RFC 3207 §4.2
# RFC 6531 §3.4: a non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_ADDRESS = Reply(553, "5.1.7", "Address not accepted: invalid or suspicious domain")
# RFC 5321 §4.1.2: a forward-path is a Mailbox (Local-part "@" Domain); only "Postmaster" may
# come without a domain. Postfix answers the same code.
NOT_A_MAILBOX = Reply(501, "5.1.3", "Bad recipient address syntax: expected local-part@domain")
# Exchange Online's own header limit is 256 KB; beyond ours the header is hostile, not mail.
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header too large")
# A NUL in the header section is read differently by different parsers (RFC 5322 §2.2).
HEADER_NUL = Reply(554, "5.6.0", "Message header contains a NUL character")
# Generic on purpose: why a message was not bound to a tenant is in the log, not the reply, so
# an attacker probing the relay learns nothing about which tenants exist (issue #5).
NOT_AUTHORIZED = Reply(550, "5.7.1", "Relaying denied: message not from a served organization")
CLIENT_CERT_REQUIRED = Reply(530, "5.7.0", "Client certificate required")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many hops, possible mail loop")
NO_ENDPOINT = Reply(550, "5.1.2", "Tenant endpoint has no mail exchanger (null MX)")
SMTPUTF8_UNSUPPORTED = Reply(553, "5.6.7", "Tenant endpoint does not support SMTPUTF8")


def reply_for(error: BaseException) -> str:
    """Map any exception to the reply line sent to the client.

    A :class:`RelayError` carries its own reply. Anything else is a bug or an unforeseen
    fault: we cannot know the message is safe, so it is a 451 (never aiosmtpd's default
    permanent ``500 Error: (ExcName) text``, which both bounces mail and leaks internals).
    """
    if isinstance(error, RelayError):
        return str(error.reply)
    log.error("unexpected error, answering 451", exc_info=error)
    return str(LOCAL_ERROR)
