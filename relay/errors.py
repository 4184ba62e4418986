"""The one error hierarchy of the relay.

Every failure that reaches an SMTP client is a :class:`RelayError` that knows its reply
(``TransientError`` → 4xx so Exchange Online retries, ``PermanentError`` → 5xx so it bounces
now). The mapping to the wire happens in exactly one place: :func:`relay.replies.reply_for`.

Like aiosmtplib's errors, some classes mix in builtins so callers can catch generically.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: basic code (RFC 5321 §4.2), enhanced code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match class of {self.code}")

    def __str__(self) -> str:
        # Replies must be a single line of printable ASCII: anything else (e.g. a downstream
        # server's text we pass on) could inject a second reply line (RFC 5321 §4.2).
        text = self.text
        if not (text.isascii() and text.isprintable()):  # (for ASCII: exactly 32-126, no control)
            text = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
        return f"{self.code} {self.enhanced} {text}".replace("  ", " ").strip()

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500


class RelayError(Exception):
    """Base class: an error that has a definite SMTP reply."""

    reply: Reply

    def __init__(self, reply: Reply, detail: str = "") -> None:
        # ``detail`` goes to the log only; replies must not leak internals.
        super().__init__(detail or reply.text)
        self.reply = reply
        self.detail = detail or reply.text


class TransientError(RelayError):
    """A failure a retry may cure: the client gets a 4xx and keeps the message."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        if not reply.transient:
            raise ValueError(f"TransientError needs a 4xx reply, got {reply.code}")
        super().__init__(reply, detail)


class PermanentError(RelayError):
    """A failure no retry will cure: the client gets a 5xx and bounces the message."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        if not 500 <= reply.code < 600:
            raise ValueError(f"PermanentError needs a 5xx reply, got {reply.code}")
        super().__init__(reply, detail)


class ConfigError(Exception):
    """Invalid configuration: names the file, the key and the reason, and stops start-up."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class ErrorList(Exception):
    """Every problem found in one pass over some files, so a person fixes them all at once."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class ConfigErrors(ConfigError):
    """Several configuration errors at once (``signature-relay check`` shows them all)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        Exception.__init__(self, "\n".join(errors))
        self.file, self.key, self.reason = "", "", "\n".join(errors)
