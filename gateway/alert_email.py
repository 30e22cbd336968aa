"""E-mail as an alert sink: each notice is one message to the configured recipients,
sent through an SMTP relay with the standard library's smtplib in a worker thread (the
event loop never waits on the relay).

Security is "starttls" (the default: plain connection upgraded before any login or
message, refused if the relay cannot), "tls" (implicit TLS, port 465) or "none" (a
local relay only). The password is a secret: logs and metrics name the sink `email#1`.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Literal

from thaw.gateway.alert_sinks import (
    AlertState,
    DeliveryFailed,
    DeliveryRefused,
    Notice,
    notice_id,
)

SmtpSecurity = Literal["starttls", "tls", "none"]


@dataclass(frozen=True)
class SmtpOptions:
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    security: SmtpSecurity = "starttls"
    username: str = ""
    password: str = field(default="", repr=False)
    """Never in a repr (logs, tracebacks)."""
    timeout: float = 10.0
    ssl_context: ssl.SSLContext | None = None
    """Trust for the relay's certificate; None = the system's CAs."""


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def email_message(notice: Notice, sender: str, recipients: tuple[str, ...]) -> EmailMessage:
    """The message of one notice: the subject says state, severity, rule and subject;
    the body the rest. Its Message-ID is stable per transition (a retry is the same
    message) and a RESOLVED one replies to its FIRING one, so mail clients thread them."""
    msg = EmailMessage()
    if notice.state is AlertState.RESOLVED:
        msg["Subject"] = f"[thaw] RESOLVED: {notice.alert} on {notice.subject}"
    else:
        msg["Subject"] = f"[thaw] FIRING [{notice.severity}]: {notice.alert} on {notice.subject}"
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(localtime=False)
    domain = sender.rpartition("@")[2] or "thaw.invalid"
    msg["Message-ID"] = f"<{notice_id(notice)}@{domain}>"
    if notice.state is AlertState.RESOLVED:
        firing = Notice(notice.alert, notice.severity, AlertState.FIRING, notice.subject,
                        notice.value, notice.threshold, notice.message, notice.started_at)
        msg["In-Reply-To"] = msg["References"] = f"<{notice_id(firing)}@{domain}>"
    lines = [notice.message, "",
             f"alert:     {notice.alert}",
             f"severity:  {notice.severity}",
             f"state:     {notice.state.value}",
             f"subject:   {notice.subject}",
             f"value:     {notice.value}",
             f"threshold: {notice.threshold}",
             f"since:     {_iso(notice.started_at)}"]
    if notice.resolved_at is not None:
        lines.append(f"resolved:  {_iso(notice.resolved_at)}")
    msg.set_content("\n".join(lines) + "\n")
    return msg


class EmailTransport:
    kind = "email"

    def __init__(self, options: SmtpOptions, index: int = 1) -> None:
        if not options.recipients:
            raise ValueError("an e-mail sink needs at least one recipient")
        self.name = f"email#{index}"
        self._options = options

    async def send(self, notice: Notice) -> None:
        msg = email_message(notice, self._options.sender, self._options.recipients)
        await asyncio.to_thread(self._send, msg)

    def _send(self, msg: EmailMessage) -> None:
        try:
            self._session(msg)
        except smtplib.SMTPNotSupportedError as exc:
            # smtplib's answer when the relay offers no STARTTLS: the message never
            # goes out in the clear.
            raise DeliveryRefused(f"{self.name}: the relay does not offer STARTTLS") from exc
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:  # permanent: a refused login, sender or message
                raise DeliveryRefused(f"{self.name}: the relay answered {exc.smtp_code}"
                                      ) from exc
            raise DeliveryFailed(f"{self.name}: the relay answered {exc.smtp_code}") from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryRefused(f"{self.name}: every recipient was refused") from exc

    def _session(self, msg: EmailMessage) -> None:
        o = self._options
        context = o.ssl_context or ssl.create_default_context()
        smtp: smtplib.SMTP
        if o.security == "tls":
            smtp = smtplib.SMTP_SSL(o.host, o.port, timeout=o.timeout, context=context)
        else:
            smtp = smtplib.SMTP(o.host, o.port, timeout=o.timeout)
        with smtp:
            smtp.ehlo()
            if o.security == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if o.username:
                smtp.login(o.username, o.password)
            smtp.send_message(msg, o.sender, list(o.recipients))
