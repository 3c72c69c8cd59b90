#!/usr/bin/env python3
"""Checks that a STUN/TURN server answers like the README says it does.

Usage: check-run.py HOST:PORT USER PASSWORD [TIMEOUT_SECONDS]

Waits (up to TIMEOUT_SECONDS, 1200 by default) until HOST:PORT answers a
STUN Binding request over UDP with XOR-MAPPED-ADDRESS, then makes a TURN
allocation with long-term credentials (401 challenge, then an authenticated
Allocate that must return XOR-RELAYED-ADDRESS) and deletes it again
(Refresh with LIFETIME 0). Written against RFC 8489/8656 with Python's
standard library only, independent of the server's own code. Exits 0 on
success, 1 with a reason otherwise.
"""

import hashlib
import hmac
import os
import socket
import struct
import sys
import time
import zlib

COOKIE = 0x2112A442
BINDING, ALLOCATE, REFRESH = 0x001, 0x003, 0x004
SUCCESS, ERROR = 0x100, 0x110
XOR_MAPPED, XOR_RELAYED = 0x0020, 0x0016
ERROR_CODE, REALM, NONCE, USERNAME = 0x0009, 0x0014, 0x0015, 0x0006
MESSAGE_INTEGRITY, FINGERPRINT = 0x0008, 0x8028
REQUESTED_TRANSPORT, LIFETIME = 0x0019, 0x000D


def attr(kind, value):
    pad = b"\0" * (-len(value) % 4)
    return struct.pack("!HH", kind, len(value)) + value + pad


def message(method, tid, attrs, key=None):
    body = b"".join(attr(k, v) for k, v in attrs)
    if key is not None:
        # MESSAGE-INTEGRITY covers the header with the length up to and
        # including itself (RFC 8489 §14.5).
        head = struct.pack("!HHI", method, len(body) + 24, COOKIE) + tid
        mac = hmac.new(key, head + body, hashlib.sha1).digest()
        body += attr(MESSAGE_INTEGRITY, mac)
    head = struct.pack("!HHI", method, len(body) + 8, COOKIE) + tid
    crc = (zlib.crc32(head + body) ^ 0x5354554E) & 0xFFFFFFFF
    body += attr(FINGERPRINT, struct.pack("!I", crc))
    return struct.pack("!HHI", method, len(body), COOKIE) + tid + body


def parse(data, tid):
    if len(data) < 20:
        raise ValueError("short answer")
    kind, length, cookie = struct.unpack("!HHI", data[:8])
    if cookie != COOKIE or data[8:20] != tid:
        raise ValueError("not the answer to our request")
    attrs, i = {}, 20
    while i + 4 <= 20 + length:
        k, n = struct.unpack("!HH", data[i : i + 4])
        attrs.setdefault(k, data[i + 4 : i + 4 + n])
        i += 4 + n + (-n % 4)
    return kind, attrs


def xor_address(value):
    family, port = struct.unpack("!xBH", value[:4])
    port ^= COOKIE >> 16
    if family != 1:
        return f"IPv6 :{port}"
    ip = struct.unpack("!I", value[4:8])[0] ^ COOKIE
    return f"{socket.inet_ntoa(struct.pack('!I', ip))}:{port}"


def transact(sock, server, method, attrs, key=None, tries=3):
    tid = os.urandom(12)
    req = message(method, tid, attrs, key)
    for _ in range(tries):
        sock.sendto(req, server)
        try:
            while True:
                data, _ = sock.recvfrom(2048)
                try:
                    return parse(data, tid)
                except ValueError:
                    continue
        except socket.timeout:
            continue
    raise TimeoutError(f"no answer to method {method:#x} from {server}")


def error_code(attrs):
    v = attrs.get(ERROR_CODE, b"\0\0\0\0")
    return v[2] * 100 + v[3]


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    host, port = sys.argv[1].rsplit(":", 1)
    server = (host, int(port))
    user, password = sys.argv[2], sys.argv[3]
    deadline = time.time() + float(sys.argv[4] if len(sys.argv) == 5 else 1200)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.5)
    while True:
        try:
            kind, attrs = transact(sock, server, BINDING, [], tries=1)
            break
        except (TimeoutError, ConnectionRefusedError):
            if time.time() > deadline:
                sys.exit(f"FAIL: no STUN answer from {sys.argv[1]}")
            time.sleep(1)
    if kind != BINDING | SUCCESS or XOR_MAPPED not in attrs:
        sys.exit(f"FAIL: Binding answered {kind:#x} without XOR-MAPPED-ADDRESS")
    print(f"ok: STUN Binding: reflexive address {xor_address(attrs[XOR_MAPPED])}")

    transport = [(REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))]
    kind, attrs = transact(sock, server, ALLOCATE, transport)
    if kind != ALLOCATE | ERROR or error_code(attrs) != 401:
        sys.exit(f"FAIL: unauthenticated Allocate answered {kind:#x} {error_code(attrs)}")
    realm, nonce = attrs[REALM], attrs[NONCE]
    key = hashlib.md5(user.encode() + b":" + realm + b":" + password.encode()).digest()
    creds = [(USERNAME, user.encode()), (REALM, realm), (NONCE, nonce)]
    kind, attrs = transact(sock, server, ALLOCATE, transport + creds, key)
    if kind != ALLOCATE | SUCCESS or XOR_RELAYED not in attrs:
        sys.exit(f"FAIL: Allocate as {user} answered {kind:#x} {error_code(attrs)}")
    print(f"ok: TURN Allocate as {user}: relayed address {xor_address(attrs[XOR_RELAYED])}")
    kind, attrs = transact(sock, server, REFRESH, [(LIFETIME, bytes(4))] + creds, key)
    if kind != REFRESH | SUCCESS:
        sys.exit(f"FAIL: Refresh with LIFETIME 0 answered {kind:#x} {error_code(attrs)}")
    print("ok: allocation deleted")


if __name__ == "__main__":
    main()
