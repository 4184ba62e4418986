"""Sans-IO message handling: bytes in, bytes out. No event loop, no sockets, no files."""
