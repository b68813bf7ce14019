"""The private channel between platform and enclave: a pair of pipes, framed as
u32 length + JSON. Nothing else in the system can read it."""

from __future__ import annotations

import json
import os
import struct

MAX_FRAME = 1 << 22


class ChannelClosed(Exception):
    pass


class PipeChannel:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r, self._w = read_fd, write_fd

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        view = memoryview(struct.pack(">I", len(data)) + data)
        while view:
            n = os.write(self._w, view)
            view = view[n:]

    def recv(self) -> dict:
        (size,) = struct.unpack(">I", self._read(4))
        if size > MAX_FRAME:
            raise ChannelClosed("oversized frame on the platform channel")
        return json.loads(self._read(size))

    def request(self, message: dict) -> dict:
        self.send(message)
        return self.recv()

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = os.read(self._r, n - len(out))
            if not chunk:
                raise ChannelClosed("the other side closed the platform channel")
            out += chunk
        return out

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
