"""The FUSE wire format, checked against the sizes and rules of linux/fuse.h."""

from __future__ import annotations

import errno
import stat

import pytest

from nodecache import fuseproto as p


def init_body(minor: int, flags: int, flags2: int = 0) -> bytes:
    return p.INIT_IN.pack(7, minor, 128 * 1024, flags, flags2) + b"\0" * 44


def test_struct_sizes_match_the_kernel():
    assert p.IN_HEADER.size == 40 and p.OUT_HEADER.size == 16
    assert p.ATTR.size == 88 and p.ENTRY_HEAD.size + p.ATTR.size == 128
    assert p.ATTR_OUT_HEAD.size + p.ATTR.size == 104
    assert p.INIT_OUT.size == p.INIT_OUT_SIZE == 64
    assert p.OPEN_OUT.size == 16 and p.KSTATFS.size == 80 and p.BACKING_MAP.size == 16
    assert p.BACKING_OPEN == 0x4010E501 and p.BACKING_CLOSE == 0x4004E502


def test_init_agrees_only_on_what_both_sides_have():
    offered = p.ASYNC_READ | p.MAX_PAGES | p.INIT_EXT | (1 << 3)
    r = p.init_reply(init_body(45, offered, flags2=p.PASSTHROUGH >> 32), want=p.ASYNC_READ | p.PASSTHROUGH)
    assert r.passthrough and r.minor == p.KERNEL_MINOR
    major, minor, ra, flags, *_rest = p.INIT_OUT.unpack(r.payload)
    assert (major, minor, ra) == (7, p.KERNEL_MINOR, 128 * 1024)
    assert flags == p.ASYNC_READ | p.INIT_EXT  # not MAX_PAGES (not wanted), not bit 3 (not wanted)
    fields = p.INIT_OUT.unpack(r.payload)
    assert fields[10] == p.PASSTHROUGH >> 32 and fields[11] == 1  # flags2, max_stack_depth


def test_no_passthrough_from_an_older_kernel_or_without_init_ext():
    old = p.init_reply(init_body(38, p.INIT_EXT, p.PASSTHROUGH >> 32), want=p.PASSTHROUGH)
    assert not old.passthrough and old.minor == 38
    no_ext = p.init_reply(init_body(45, 0, p.PASSTHROUGH >> 32), want=p.PASSTHROUGH)
    assert not no_ext.passthrough
    assert p.INIT_OUT.unpack(no_ext.payload)[11] == 0  # max_stack_depth only with passthrough


def test_wrong_major_is_refused():
    with pytest.raises(p.ProtocolError):
        p.init_reply(p.INIT_IN.pack(8, 0, 0, 0, 0), want=0)


def test_requests_parse_and_length_is_checked():
    body = b"config.json\0"
    raw = p.IN_HEADER.pack(40 + len(body), p.LOOKUP, 99, 1, 0, 0, 123, 0, 0) + body
    req = p.parse_request(raw)
    assert (req.opcode, req.unique, req.nodeid, req.pid) == (p.LOOKUP, 99, 1, 123)
    assert p.name_arg(req.body) == b"config.json"
    with pytest.raises(p.ProtocolError):
        p.parse_request(raw + b"x")
    with pytest.raises(p.ProtocolError):
        p.parse_request(raw[:20])


def test_replies_carry_negative_errno_and_total_length():
    length, error, unique = p.OUT_HEADER.unpack(p.out_header(5, errno.ENOENT))
    assert (length, error, unique) == (16, -errno.ENOENT, 5)
    assert p.OUT_HEADER.unpack(p.out_header(6, 0, 100))[0] == 116


def test_dirents_are_padded_to_eight_bytes():
    a = p.Attr(ino=7, mode=stat.S_IFLNK | 0o777, size=3, timeout=1.5)
    rec = p.dirent(b"abc", a, 3, plus=False)
    assert len(rec) % 8 == 0 and len(rec) == 24 + 8
    ino, off, namelen, typ = p.DIRENT_HEAD.unpack_from(rec)
    assert (ino, off, namelen, typ) == (7, 3, 3, stat.S_IFLNK >> 12)
    plus = p.dirent(b"abc", a, 3, plus=True)
    assert plus[128:] == rec and plus[:128] == p.entry_out(a)
    nodeid, _gen, entry_s, attr_s, entry_ns, _ = p.ENTRY_HEAD.unpack_from(plus)
    assert (nodeid, entry_s, attr_s, entry_ns) == (7, 1, 1, 500_000_000)


def test_attr_packs_size_blocks_and_mode():
    a = p.Attr(ino=2, mode=stat.S_IFREG | 0o444, size=1000, time_ns=1_700_000_000_123_456_789)
    f = p.ATTR.unpack(a.pack())
    assert f[0:3] == (2, 1000, 2) and f[3] == 1_700_000_000 and f[6] == 123_456_789 and f[9] == a.mode


def test_inval_inode_notification_is_an_unsolicited_message():
    """fuse_out_header with unique 0 and the notify code (2) in the error field, then
    fuse_notify_inval_inode_out {u64 ino; s64 off; s64 len}: 40 bytes."""
    msg = p.notify_inval_inode(1234)
    assert len(msg) == 40 and p.NOTIFY_INVAL_INODE_OUT.size == 24
    assert p.OUT_HEADER.unpack_from(msg) == (40, 2, 0)
    assert p.NOTIFY_INVAL_INODE_OUT.unpack_from(msg, 16) == (1234, 0, 0)  # every page, to the end
    assert p.NOTIFY_INVAL_INODE_OUT.unpack_from(p.notify_inval_inode(7, -1), 16) == (7, -1, 0)  # attributes only
