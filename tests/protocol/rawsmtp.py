"""A byte-exact SMTP client for attack tests: sends exactly what it is given, reads raw replies."""

from __future__ import annotations

import asyncio
import ssl


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Raw:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def reply(self, wait: float = 10) -> str:
        """One complete (possibly multi-line) reply; "" when the server closed the connection."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), wait)
            if not line:
                return "\n".join(lines)
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: bytes) -> str:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext, server_hostname: str | None = "smtp.signature-relay.test") -> None:
        await self.writer.start_tls(ctx, server_hostname=server_hostname)

    async def closed(self, wait: float = 10) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), wait) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.writer.close()
