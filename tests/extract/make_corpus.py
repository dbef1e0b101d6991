#!/usr/bin/env python3
"""Generate hostile, broken and valid tarballs for the extractor's tests and fuzzer seeds.

Usage: make_corpus.py OUTDIR [--sentinel DIR] [--canary NAME]

Every file is generated at test time (nothing is committed). Attacks aim at --sentinel, an
absolute directory the test places beside the extraction root and snapshots, so that a
broken extractor damages the sentinel rather than the host. The few members that aim at
the real /etc only ever create a new file named --canary, which the test looks for.

The C test (tests/unit/test_extract.c) knows what each file must produce; the file names
here are its keys. Files ending in .tar/.gz/.zst/.xz/.bz2/.zip/.bin are all archives.
"""

import argparse
import bz2
import gzip
import io
import lzma
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

T0 = 1_600_000_000  # a fixed, old mtime: anything "now" would mean it was not applied
CAP_NET_BIND = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")


class Tar:
    """A tarball built member by member with tarfile, in memory."""

    def __init__(self, fmt=tarfile.PAX_FORMAT):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=fmt)

    def add(self, name, kind=tarfile.REGTYPE, data=b"", mode=None, uid=0, gid=0,
            mtime=T0, link="", pax=None, devmajor=0, devminor=0):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        ti.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
        ti.uid, ti.gid, ti.mtime = uid, gid, mtime
        ti.uname = ti.gname = ""
        ti.linkname = link
        ti.devmajor, ti.devminor = devmajor, devminor
        if pax:
            ti.pax_headers = dict(pax)
        self.tf.addfile(ti, io.BytesIO(data) if ti.size else None)
        return self

    def dir(self, name, **kw):
        return self.add(name, tarfile.DIRTYPE, **kw)

    def symlink(self, name, target, **kw):
        return self.add(name, tarfile.SYMTYPE, link=target, **kw)

    def hardlink(self, name, target, **kw):
        return self.add(name, tarfile.LNKTYPE, link=target, **kw)

    def bytes(self):
        self.tf.close()
        return self.buf.getvalue()


def raw_header(name, kind=b"0", size=0, link=b"", mode=0o644, magic=b"ustar\x0000",
               prefix=b"", extra=()):
    """One 512-byte ustar header with a correct checksum; byte fields are taken verbatim.

    @extra: (offset, bytes) pairs written last, e.g. old GNU sparse fields."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\x00" % mode
    h[108:116] = b"%07o\x00" % 0
    h[116:124] = b"%07o\x00" % 0
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"%011o\x00" % T0
    h[156:157] = kind
    h[157:157 + len(link)] = link
    h[257:265] = magic
    h[345:345 + len(prefix)] = prefix
    for off, val in extra:
        h[off:off + len(val)] = val
    fix_checksum(h)
    return bytes(h)


GNU_MAGIC = b"ustar  \x00"


def old_gnu_sparse(name, ext_blocks, entry=b"%011o\x00%011o\x00" % (0, 0)):
    """An old GNU 'S' header with 4 map entries and @ext_blocks extension blocks of 21 each.

    The map is nonsense (every entry says 0 bytes at 0), and there is no data: what matters is
    how many entries libarchive keeps. Returns the header and extension blocks."""
    more = b"\x01" if ext_blocks else b"\x00"
    h = raw_header(name, b"S", 0, magic=GNU_MAGIC,
                   extra=((386, entry * 4), (482, more), (483, b"%011o\x00" % 0)))
    ext = bytearray(512)
    ext[0:504] = entry * 21
    ext[504] = 1
    last = bytearray(ext)
    last[504] = 0
    return h + bytes(ext) * max(ext_blocks - 1, 0) + (bytes(last) if ext_blocks else b"")


def sparse10(name, count, lines):
    """A pax GNU 1.0 sparse member whose map declares @count entries and holds @lines of them."""
    body = b"".join(pax_record(k, v) for k, v in (
        (b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", name), (b"GNU.sparse.realsize", b"0")))
    m = pad(b"%d\n" % count + b"0\n0\n" * lines)
    return (raw_header(b"PaxHeaders/" + name, b"x", len(body)) + pad(body) +
            raw_header(b"GNUSparseFile.0/" + name, b"0", len(m)) + m)


def pax_member(name, records, data=b""):
    """A pax header with raw @records (repeats allowed), then a regular member."""
    body = b"".join(pax_record(k, v) for k, v in records)
    return (raw_header(b"PaxHeaders/" + name, b"x", len(body)) + pad(body) +
            raw_header(name, b"0", len(data)) + pad(data))


def fix_checksum(h):
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)


def tab_size(h):
    """The header with its size field written as a tab and 10 octal digits, checksum fixed."""
    h = bytearray(h)
    size = int(bytes(h[124:136]).rstrip(b"\x00 "), 8)
    h[124:136] = b"\t%010o\x00" % size
    fix_checksum(h)
    return bytes(h)


def base256_size(h):
    """The header with its size field as base-256 -1 (all 0xff bytes), checksum fixed."""
    h = bytearray(h)
    h[124:136] = b"\xff" * 12
    fix_checksum(h)
    return bytes(h)


def pad(data):
    return data + b"\x00" * (-len(data) % 512)


def raw_tar(*members):
    """Concatenate (header, data) pairs and the end-of-archive marker."""
    out = b""
    for header, data in members:
        out += header + pad(data)
    return out + b"\x00" * 1024


def pax_record(key, value):
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


def hostile(sent, canary):
    """name -> bytes: archives that must be refused."""
    out = {}
    out["dotdot.tar"] = Tar().add("../sentinel/pwned", data=b"x").bytes()
    out["dotdot_deep.tar"] = Tar().dir("a").add("a/../../pwned", data=b"x").bytes()
    out["dotdot_inside.tar"] = Tar().dir("a").add("a/../b", data=b"x").bytes()
    out["absolute.tar"] = Tar().add(sent + "/pwned", data=b"x").bytes()
    out["symlink_escape_abs.tar"] = (
        Tar().symlink("a", sent + "/etc").add("a/passwd", data=b"pwned\n").bytes())
    out["symlink_escape_etc.tar"] = (
        Tar().symlink("a", "/etc").add("a/" + canary, data=b"pwned\n").bytes())
    out["symlink_escape_rel.tar"] = (
        Tar().symlink("a", "../sentinel/etc").add("a/passwd", data=b"pwned\n").bytes())
    out["symlink_dot.tar"] = Tar().symlink("a", ".").add("a/x", data=b"x").bytes()
    out["symlink_dotdot.tar"] = (
        Tar().symlink("a", "..").add("a/sentinel/pwned", data=b"x").bytes())
    out["symlink_chain.tar"] = (
        Tar().symlink("l1", "l2").symlink("l2", sent).add("l1/pwned", data=b"x").bytes())
    out["symlink_deep_parent.tar"] = (
        Tar().dir("d").symlink("d/s", "/").add("d/s/tmp/" + canary, data=b"x").bytes())
    out["symlink_dir_member.tar"] = Tar().symlink("a", sent).dir("a/newdir").bytes()
    out["hardlink_abs.tar"] = Tar().hardlink("h", sent + "/etc/passwd").bytes()
    out["hardlink_escape.tar"] = Tar().hardlink("h", "../sentinel/etc/passwd").bytes()
    out["hardlink_symlink_parent.tar"] = (
        Tar().symlink("s", sent + "/etc").hardlink("h", "s/passwd").bytes())
    out["hardlink_forward.tar"] = (
        Tar().hardlink("h", "later").add("later", data=b"x").bytes())
    out["hardlink_dir.tar"] = Tar().dir("d").hardlink("h", "d").bytes()
    out["hardlink_missing_parent.tar"] = Tar().hardlink("h", "nodir/file").bytes()
    out["hardlink_root.tar"] = Tar().hardlink("h", "./").bytes()
    out["hardlink_preexisting.tar"] = Tar().hardlink("h", "pre").bytes()
    out["preexisting_symlink.tar"] = Tar().add("link/pwned", data=b"x").bytes()
    out["dir_replaced_by_symlink.tar"] = (
        Tar().dir("d").symlink("d", sent).add("d/pwned", data=b"x").bytes())
    out["dir_nonempty_replaced.tar"] = (
        Tar().dir("d").add("d/f", data=b"x").symlink("d", sent).bytes())
    out["root_symlink.tar"] = Tar().symlink(".", sent).bytes()
    out["root_file.tar"] = Tar().add(".", data=b"").bytes()
    out["file_parent.tar"] = Tar().add("f", data=b"x").add("f/g", data=b"y").bytes()
    out["huge_uid.tar"] = Tar().add("f", data=b"x", pax={"uid": "4294967296"}).bytes()
    out["symlink_empty_target.tar"] = raw_tar((raw_header(b"s", b"2"), b""))
    out["empty_name.tar"] = raw_tar((raw_header(b"", b"0", 1), b"x"))
    out["nul_pax_path.tar"] = Tar().add("ok", data=b"x",
                                        pax={"path": "safe\x00../../pwned"}).bytes()
    out["nul_pax_linkpath.tar"] = Tar().add("f", data=b"x").symlink(
        "s", "f", pax={"linkpath": "f\x00/etc/shadow"}).bytes()
    name = b"safe\x00../../pwned"
    out["nul_ustar_name.tar"] = raw_tar((raw_header(name, b"0", 1), b"x"))
    out["nul_ustar_prefix.tar"] = raw_tar(
        (raw_header(b"file", b"0", 1, prefix=b"dir\x00../.."), b"x"))
    longname = b"safe\x00" + b"x" * 120 + b"\x00"
    out["nul_gnu_longname.tar"] = raw_tar(
        (raw_header(b"././@LongLink", b"L", len(longname), magic=b"ustar  \x00"), longname),
        (raw_header(b"trunc", b"0", 1, magic=b"ustar  \x00"), b"x"))
    out["nul_ustar_link.tar"] = raw_tar((raw_header(b"f", b"0", 1), b"x"),
                                        (raw_header(b"s", b"2", link=b"f\x00/etc/shadow"), b""))
    longlink = b"f\x00" + b"../" * 40 + b"etc/shadow\x00"
    out["nul_gnu_longlink.tar"] = raw_tar(
        (raw_header(b"f", b"0", 1, magic=b"ustar  \x00"), b"x"),
        (raw_header(b"././@LongLink", b"K", len(longlink), magic=b"ustar  \x00"), longlink),
        (raw_header(b"s", b"2", link=b"f", magic=b"ustar  \x00"), b""))
    # libarchive reads a size field that starts with a tab (it skips spaces and tabs): the
    # scan must find the body there too, or the NUL in the name goes unseen.
    nul_path = pax_record(b"path", b"safe\x00../../pwned")
    first = (raw_header(b"first", b"0", 1), b"x")  # libarchive's format bid wants octal
    out["tab_size_pax.tar"] = raw_tar(
        first, (tab_size(raw_header(b"PaxHeader/ok", b"x", len(nul_path))), nul_path),
        (raw_header(b"ok", b"0", 1), b"x"))
    out["tab_size_gnu_longname.tar"] = raw_tar(
        first, (tab_size(raw_header(b"././@LongLink", b"L", len(longname), magic=b"ustar  \x00")),
         longname),
        (raw_header(b"trunc", b"0", 1, magic=b"ustar  \x00"), b"x"))
    # Seventeen extension headers whose bodies all overlap: only crafted input does that.
    ext = raw_header(b"PaxHeader/x", b"x", 64 << 10)
    out["overlapping_ext_headers.tar"] = ext * 17 + b"\x00" * (80 << 10)
    out["negative_size.tar"] = raw_tar((raw_header(b"a", b"0", 1), b"x"),
                                       (base256_size(raw_header(b"neg", b"0", 0)), b""))
    out["hardlink_target_too_long.tar"] = (
        Tar().add("f", data=b"x").hardlink("h", "t" * 5000).bytes())
    out["hardlink_target_too_deep.tar"] = (
        Tar().hardlink("h", "/".join(["d"] * 70) + "/f").bytes())
    # The GNU 0.1 pax sparse format: a map of "offset,size" pairs.
    sparse_pax = {"GNU.sparse.name": "s", "GNU.sparse.realsize": "4096"}
    out["sparse_bad_map.tar"] = Tar().add(
        "GNUSparseFile.0/s", data=b"x", pax=dict(sparse_pax, **{"GNU.sparse.map": "0,x"})).bytes()
    # A 1 TiB hole, then one byte: more than the (lowered) limit on file data, as a size.
    out["sparse_huge_size.tar"] = Tar().add("GNUSparseFile.0/s", data=b"x", pax=dict(
        sparse_pax, **{"GNU.sparse.map": "1099511627776,1",
                       "GNU.sparse.realsize": "1099511627777"})).bytes()
    # Data placed past the end of the file by the map.
    out["sparse_map_past_size.tar"] = Tar().add("GNUSparseFile.0/s", data=b"x", pax=dict(
        sparse_pax, **{"GNU.sparse.map": "1099511627776,1"})).bytes()
    # pax records override the ustar fields: a harmless ustar name or link target is no
    # defence when the pax path, linkpath or GNU.sparse.name escapes.
    out["pax_path_dotdot.tar"] = Tar().add("harmless", data=b"x",
                                           pax={"path": "../sentinel/pwned"}).bytes()
    out["pax_path_absolute.tar"] = Tar().add("harmless", data=b"x",
                                             pax={"path": sent + "/pwned"}).bytes()
    out["pax_linkpath_dotdot.tar"] = Tar().add("f", data=b"x").hardlink(
        "h", "f", pax={"linkpath": "../sentinel/etc/passwd"}).bytes()
    out["pax_linkpath_up_etc.tar"] = Tar().add("f", data=b"x").hardlink(
        "h", "f", pax={"linkpath": "../../etc"}).bytes()
    out["pax_linkpath_absolute.tar"] = Tar().add("f", data=b"x").hardlink(
        "h", "f", pax={"linkpath": sent + "/etc/passwd"}).bytes()
    out["pax_sparse_name_dotdot.tar"] = Tar().add("GNUSparseFile.0/harmless", data=b"x", pax={
        "GNU.sparse.name": "../sentinel/pwned", "GNU.sparse.realsize": "4096",
        "GNU.sparse.map": "0,1"}).bytes()
    out["pax_sparse_name_absolute.tar"] = Tar().add("GNUSparseFile.0/harmless", data=b"x", pax={
        "GNU.sparse.name": sent + "/pwned", "GNU.sparse.realsize": "4096",
        "GNU.sparse.map": "0,1"}).bytes()
    # The same in a GNU 1.0 sparse member, whose map is in the data and whose name is only in
    # the pax records (the ustar name is GNU tar's placeholder).
    body = b"".join(pax_record(k, v) for k, v in (
        (b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"../sentinel/pwned"), (b"GNU.sparse.realsize", b"4096")))
    m = pad(b"1\n0\n1\n") + pad(b"x")
    out["pax_sparse10_name_dotdot.tar"] = raw_tar(
        (raw_header(b"PaxHeaders/harmless", b"x", len(body)), body),
        (raw_header(b"GNUSparseFile.0/harmless", b"0", len(m)), m))
    # A charset warning (raw bytes in a pax path) must not hide an earlier one (a map libarchive
    # cannot parse), whose message it replaces.
    risky = b"".join(pax_record(k, v) for k, v in (
        (b"GNU.sparse.map", b"0,x"),
        (b"GNU.sparse.name", b"raw\xe9"), (b"GNU.sparse.realsize", b"4096")))
    out["charset_hides_warning.tar"] = raw_tar(
        (raw_header(b"PaxHeader/s", b"x", len(risky)), risky),
        (raw_header(b"GNUSparseFile.0/s", b"0", 1), b"x"))
    # Directories: too many distinct ones for the (lowered) memory cap.
    t = Tar(tarfile.GNU_FORMAT)
    for i in range(6000):
        t.dir("%05d" % i + "d" * 200)
    out["dirs_memory_cap.tar.gz"] = gzip.compress(t.bytes(), mtime=0)
    bad_pax = b"99 path=nope\n"
    out["malformed_pax.tar"] = raw_tar((raw_header(b"PaxHeader/f", b"x", len(bad_pax)),
                                        bad_pax), (raw_header(b"f", b"0", 1), b"x"))
    out["component_too_long.tar"] = Tar().add("d/" + "c" * 300, data=b"x").bytes()

    # Limits; the test lowers max_entries to 100 and max_total_bytes to 1 MiB for these.
    t = Tar()
    for i in range(101):
        t.add("f%03d" % i, data=b"x")
    out["too_many_entries.tar"] = t.bytes()
    out["too_many_bytes.tar"] = (Tar().add("a", data=b"a" * (600 << 10))
                                 .add("b", data=b"b" * (600 << 10)).bytes())
    out["too_deep.tar"] = Tar().add("/".join(["d"] * 65) + "/f", data=b"x").bytes()
    out["too_long.tar"] = Tar().add("/".join(["n" * 200] * 21), data=b"x").bytes()
    out["symlink_target_too_long.tar"] = Tar().symlink("s", "t" * 5000).bytes()

    # Broken streams.
    good = Tar().add("a", data=b"A" * 5000).add("b", data=b"B" * 5000).bytes()
    out["truncated_data.tar"] = good[:512 + 2048]
    out["truncated_header.tar"] = good[:512 + 5120 + 300]
    bad = bytearray(good)
    bad[5632 + 148] ^= 0x01  # checksum of the second header
    out["bad_checksum.tar"] = bytes(bad)
    out["garbage.bin"] = random.Random(42).randbytes(8192)
    out["empty_file.bin"] = b""
    out["zip_archive.zip"] = make_zip()
    out["truncated_at_member.tar"] = good[:512 + 5120]
    # Cut right after a member whose last data block is all zeros: the last block read is
    # zeros, but it is not the end-of-archive marker.
    zeros = Tar().add("z", data=b"Z" * 512 + b"\x00" * 512).add("b", data=b"B").bytes()
    out["truncated_after_zero_block.tar"] = zeros[:512 + 1024]
    out["truncated_after_zero_block.tar.gz"] = gzip.compress(zeros[:512 + 1024], mtime=0)
    out["huge_xz_dictionary.tar.xz"] = xz_with_dict_code(good, 40)
    out["truncated_at_member.tar.gz"] = gzip.compress(good[:512 + 5120], mtime=0)
    # Random data does not compress, so cutting the gzip stream cuts the tar stream.
    noisy = Tar().add("r", data=random.Random(3).randbytes(64 << 10)).bytes()
    out["truncated.tar.gz"] = gzip.compress(noisy, mtime=0)[:30000]
    # 80 MiB of zeros as the body of a pax hardlink: libarchive reads and skips it, nothing
    # is written, so only the cap on the decompressed stream stops it (the test lowers the
    # limits so that the cap is about 65 MiB).
    comment = pax_record(b"comment", b"x")
    bomb = raw_tar((raw_header(b"f", b"0", 1), b"x"),
                   (raw_header(b"PaxHeader/h", b"x", len(comment)), comment),
                   (raw_header(b"h", b"1", 80 << 20, link=b"f"), b"\x00" * (80 << 20)))
    out["bomb_skipped_data.tar.gz"] = gzip.compress(bomb, compresslevel=9, mtime=0)
    out["garbage_after_gzip_magic.tar.gz"] = b"\x1f\x8b\x08\x00" + random.Random(7).randbytes(2048)
    # A single zero block, then more members: libarchive (and GNU tar) would stop there.
    out["lone_zero_then_member.tar"] = raw_tar((raw_header(b"a", b"0", 1), b"A"),
                                               (b"\x00" * 512, b""),
                                               (raw_header(b"b", b"0", 1), b"B"))

    # Sparse maps past the limit; the test lowers max_sparse_entries to 100 for these.
    out["sparse_old_chain.tar"] = old_gnu_sparse(b"sp", 10) + b"\x00" * 1024
    out["sparse_10_count.tar"] = sparse10(b"sp", 101, 101) + b"\x00" * 1024
    out["sparse_01_map.tar"] = pax_member(b"s", (
        (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.realsize", b"1"),
        (b"GNU.sparse.map", b",".join([b"0,0"] * 101)))) + b"\x00" * 1024
    out["sparse_00_records.tar"] = pax_member(b"s", [
        (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.size", b"1"),
        (b"GNU.sparse.numblocks", b"101")] + [(b"GNU.sparse.offset", b"0"),
                                              (b"GNU.sparse.numbytes", b"0")] * 101) + \
        b"\x00" * 1024
    out["sparse_sun_holes.tar"] = pax_member(b"sp", (
        (b"SUN.holesdata", b" " + b" ".join(b"%d" % (i * 2) for i in range(202))),),
        data=b"x" * 202) + b"\x00" * 1024
    # A map of one segment that covers the whole file: libarchive drops such a map when it is
    # counted, which once left its iteration cursor on freed memory (found by the fuzzer).
    out["sparse_whole_01.tar"] = pax_member(b"s", (
        (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.realsize", b"5"),
        (b"GNU.sparse.map", b"0,5")), data=b"hello") + b"\x00" * 1024
    out["sparse_whole_00.tar"] = pax_member(b"s", (
        (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.size", b"5"),
        (b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.offset", b"0"),
        (b"GNU.sparse.numbytes", b"5")), data=b"hello") + b"\x00" * 1024
    # The same with the default limit, big: old GNU with 96000 extension blocks (2 million
    # entries, 48 MiB), and a GNU 1.0 map declaring 4 million (16 MiB). libarchive would keep
    # some 100 and 200 MiB of map for them; the test checks that memory stays far below.
    out["sparse_old_huge.tar.gz"] = gzip.compress(
        old_gnu_sparse(b"sp", 96000) + b"\x00" * 1024, compresslevel=6, mtime=0)
    out["sparse_10_huge.tar.gz"] = gzip.compress(
        sparse10(b"sp", 4 << 20, 4 << 20) + b"\x00" * 1024, compresslevel=6, mtime=0)
    # A sparse map whose segments hold more data than the member stores: libarchive reads 512
    # bytes, the scan would skip 1024, and the next header (a name cut at a NUL) sits between.
    # And one whose segments hold less: libarchive reads the next header inside a block.
    out["sparse_map_longer_than_data.tar"] = raw_tar(
        (raw_header(b"first", b"0", 1), b"x")) [:1024] + pax_member(b"s", (
            (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.realsize", b"2048"),
            (b"GNU.sparse.map", b"0,1024")), data=b"d" * 512) + \
        raw_tar((raw_header(b"safe\x00../../pwned", b"0", 1), b"x"))
    out["sparse_map_shorter_than_data.tar"] = pax_member(b"s", (
        (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.realsize", b"2048"),
        (b"GNU.sparse.map", b"0,1")), data=b"d" + b"\x00" * 10 + b"unaligned header") + \
        b"\x00" * 1024

    # Devices and FIFOs replace what is at their name like any other member, and follow the
    # same rules on the way there.
    out["device_over_nonempty_dir.tar"] = (
        Tar().dir("d").add("d/f", data=b"x").add("d", tarfile.CHRTYPE, devmajor=1, devminor=3)
        .bytes())
    out["device_under_symlink.tar"] = (
        Tar().symlink("a", sent).add("a/null", tarfile.CHRTYPE, devmajor=1, devminor=3).bytes())
    # Names with quotes and control bytes are escaped in messages.
    out["dotdot_quoted.tar"] = Tar().add('../x"\nkey=v', data=b"x").bytes()
    out["symlink_parent_quoted.tar"] = (
        Tar().symlink("a\tb", sent).add("a\tb/x", data=b"x").bytes())
    return out


def xz_with_dict_code(data, code):
    """An xz file of @data whose LZMA2 block header asks for dictionary size @code (40: 4 GiB).

    The data decodes with any dictionary at least as large as the one used, so only the
    declared size changes; the block header's CRC32 is recomputed.
    """
    import zlib
    xz = bytearray(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                 filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]))
    hdr = 12  # the stream header
    size = (xz[hdr] + 1) * 4
    flags = xz[hdr + 1]
    pos = hdr + 2
    if flags & 0x40 or flags & 0x80 or flags & 0x03:
        sys.exit("make_corpus: unexpected xz block header from lzma")
    if xz[pos:pos + 2] != b"\x21\x01":  # LZMA2, one byte of properties
        sys.exit("make_corpus: unexpected xz filter flags")
    xz[pos + 2] = code
    xz[hdr + size - 4:hdr + size] = zlib.crc32(bytes(xz[hdr:hdr + size - 4])).to_bytes(4, "little")
    return bytes(xz)


def make_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


def valid(sent):
    """name -> bytes: archives that must extract."""
    out = {}
    t = Tar()
    t.dir("./", mode=0o750, mtime=T0 + 1)
    t.dir("./etc/", mtime=T0 + 3)
    t.add("./etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n",
          pax={"mtime": "1600000010.123456789"})
    t.add("./etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42)
    t.dir("./bin/")
    t.add("./bin/su", data=b"\x7fELF-su", mode=0o4755)
    t.add("./bin/wall", data=b"\x7fELF-wall", mode=0o2755, gid=5)
    t.hardlink("./bin/su-hard", "./bin/su")
    t.hardlink("./etc/passwd-link", "etc/passwd")
    t.dir("./tmp/", mode=0o1777)
    t.dir("./home/user/", mode=0o700, uid=1234, gid=5678)
    t.add("./home/user/notes", data=b"n", mode=0o600, uid=1234, gid=5678)
    t.dir("./ro/", mode=0o555)
    t.add("./ro/a", data=b"a", mode=0o444)
    t.dir("./ro/sub/", mode=0o500)
    t.add("./ro/sub/b", data=b"b")
    # Absolute and escaping links aim at the sentinel: were one ever followed (by a chown,
    # say), the test would see the sentinel change, and no host file would.
    t.symlink("./abs", sent + "/etc/passwd", uid=1234, gid=5678, mtime=T0 + 2)
    t.symlink("./rel", "etc/passwd")
    t.symlink("./dangling", "nowhere/at/all")
    t.symlink("./loop", "loop")
    t.symlink("./up", "../sentinel/etc/shadow")
    t.add("./empty", data=b"")
    t.add("./big", data=bytes(range(256)) * (3 << 12))  # 3 MiB
    t.add("usr/lib/deep/file", data=b"implicit parents")
    out["basic.tar"] = t.bytes()

    # Set-id bits on files of other owners: chown() clears them, so they survive only when
    # the mode is applied after the owner (for root's own files the chown is skipped).
    out["setuid.tar"] = (
        Tar().add("su", data=b"x", mode=0o6755, uid=0, gid=0)
        .add("suid-user", data=b"u", mode=0o4755, uid=1234, gid=1234)
        .add("sgid-group", data=b"g", mode=0o2755, uid=1234, gid=1234)
        .add("both-other", data=b"b", mode=0o6750, uid=1234, gid=5678)
        .dir("sgid-dir", mode=0o2775, uid=1234, gid=1234)
        .add("sgid-dir/f", data=b"f", mode=0o4711, uid=1234, gid=1234).bytes())
    out["specials.tar"] = (Tar().dir("dev").add("dev/null", tarfile.CHRTYPE, devmajor=1,
                                                devminor=3)
                           .add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
                           .add("dev/fifo", tarfile.FIFOTYPE).bytes())
    for fmt, tag in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")):
        long_dir = "long/" + "d" * 150
        long_file = long_dir + "/" + "f" * 200
        out["longname_%s.tar" % tag] = (
            Tar(fmt).dir(long_dir).add(long_file, data=b"long")
            .symlink(long_dir + "/s", "t" * 180)
            .hardlink(long_dir + "/h", long_file).bytes())
    out["ustar_prefix.tar"] = (Tar(tarfile.USTAR_FORMAT)
                               .add("p" * 90 + "/" + "q" * 90 + "/file", data=b"prefix")
                               .bytes())
    cap = CAP_NET_BIND.decode("utf-8", "surrogateescape")
    out["xattrs.tar"] = (
        Tar().dir("d", pax={"SCHILY.xattr.user.d": "dir"})
        .add("f", data=b"x", pax={
            "SCHILY.xattr.user.x": "hello",
            "SCHILY.xattr.trusted.x": "no",
            "SCHILY.xattr.user.overlay.opaque": "y",
            "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0",
            "SCHILY.xattr.security.capability": cap,
            "LIBARCHIVE.xattr.user.y": "d29ybGQ=",  # base64 "world"
        })
        .symlink("s", "f", pax={"SCHILY.xattr.user.s": "on-a-symlink"}).bytes())
    # POSIX ACLs, both ways tar writes them: as the kernel's system.posix_acl_* xattrs (a
    # valid value, which the kernel would apply) and as SCHILY.acl.* text that libarchive
    # parses into the entry. Each grants uid 1234 access the mode alone does not; the modes
    # are what stat shows for such files (the group bits are the ACL's mask).
    acl = bytes.fromhex("02000000" "0100" "0600" "ffffffff" "0200" "0400" "d2040000"
                        "0400" "0400" "ffffffff" "1000" "0400" "ffffffff" "2000" "0000"
                        "ffffffff").decode("utf-8", "surrogateescape")
    text = "user::rwx,user:1234:r-x,group::r-x,mask::r-x,other::---"
    out["acls.tar"] = (
        Tar().add("xattr-acl", data=b"x", mode=0o640, pax={
            "SCHILY.xattr.system.posix_acl_access": acl, "SCHILY.xattr.user.kept": "yes"})
        .add("schily-acl", data=b"s", mode=0o750, pax={"SCHILY.acl.access": text})
        .dir("dir-acl", mode=0o750, pax={"SCHILY.acl.access": text,
                                         "SCHILY.acl.default": text,
                                         "SCHILY.xattr.system.posix_acl_default": acl})
        .bytes())
    latin = b"latin\xe9".decode("utf-8", "surrogateescape")
    out["utf8.tar"] = (Tar().add("caf\u00e9/na\u00efve.txt", data=b"utf8").bytes())
    out["latin1_gnu.tar"] = Tar(tarfile.GNU_FORMAT).add(latin, data=b"latin1").bytes()
    raw_path = pax_record(b"path", b"raw\xe9")
    out["latin1_pax_raw.tar"] = raw_tar((raw_header(b"PaxHeader/r", b"x", len(raw_path)),
                                         raw_path), (raw_header(b"r", b"0", 3), b"raw"))
    out["duplicates.tar"] = (
        Tar().add("f", data=b"one").symlink("f", sent + "/etc/passwd")
        .add("f", data=b"two")
        .dir("d").add("d", data=b"file-now")
        .hardlink("h", "f").add("h", data=b"three")
        .symlink("x", "y").dir("x")
        .dir("e", mode=0o700).dir("e", mode=0o751)
        .add("g", data=b"old").hardlink("g", "f")
        .symlink("s", sent + "/etc/passwd").bytes())
    out["preexisting_replace.tar"] = Tar().add("s", data=b"mine").bytes()
    out["hardlink_self.tar"] = Tar().add("f", data=b"x").hardlink("f", "f").bytes()
    # GNU tar archives hardlinks to symlinks as such; linkat() links the symlink itself.
    out["hardlink_to_symlink.tar"] = (
        Tar().symlink("s", sent + "/etc/passwd", uid=1234).hardlink("h", "s").bytes())
    # Hardlinks to device nodes and FIFOs, which are skipped: the links are skipped too.
    out["hardlink_to_device.tar"] = (
        Tar().dir("dev").add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        .add("dev/fifo", tarfile.FIFOTYPE).hardlink("dev/null2", "dev/null")
        .hardlink("fifo2", "dev/fifo").add("nodir/sda", tarfile.BLKTYPE, devmajor=8)
        .hardlink("sda2", "nodir/sda").bytes())
    # A directory, then a symlink at the same name aiming at the sentinel: the directory's
    # deferred owner, mode and times must not reach the sentinel through the symlink.
    out["dir_swapped_for_symlink.tar"] = (
        Tar().dir("d", mode=0o700, uid=1234, gid=5678, mtime=T0 + 5)
        .symlink("d", sent, uid=0).add("f", data=b"x").bytes())
    # One long directory name given 2000 times: remembered once.
    long_dir = "/".join(["r" * 250] * 15)
    t = Tar(tarfile.GNU_FORMAT)
    for _ in range(2000):
        t.dir(long_dir, mode=0o751)
    out["dirs_duplicates.tar.gz"] = gzip.compress(t.bytes(), mtime=0)
    # Member data that holds tar headers with NUL-cut names is just data.
    inner = (raw_tar((raw_header(b"safe\x00../../pwned", b"0", 1), b"x")) +
             Tar().add("ok", data=b"x", pax={"path": "safe\x00../x"}).bytes())
    out["embedded_tar.tar"] = Tar().add("inner.tar", data=inner).add("after", data=b"y").bytes()
    out["empty_archive.tar"] = b"\x00" * 10240
    # What git archive writes for an empty tree: a global header, then the end.
    comment = pax_record(b"comment", b"0123456789abcdef0123456789abcdef01234567")
    out["global_header_only.tar"] = raw_tar(
        (raw_header(b"pax_global_header", b"g", len(comment)), comment))
    # Timestamps out of any filesystem's range, negative, or not numbers: libarchive clamps
    # or zeroes them, the filesystem clamps what is left; like GNU tar, nothing fails.
    out["odd_timestamps.tar"] = (
        Tar().add("future", data=b"f", pax={"mtime": "99999999999999999999.5"})
        .add("past", data=b"p", pax={"mtime": "-99999999999999999999"})
        .add("junk", data=b"j", pax={"mtime": "abc", "atime": "-1.5"})
        .dir("d", pax={"mtime": "18446744073709551616"}).bytes())
    out["many_hardlinks.tar"] = many_hardlinks()
    out["gnu_format.tar"] = (Tar(tarfile.GNU_FORMAT).dir("d").add("d/f", data=b"gnu")
                             .symlink("d/s", "f").bytes())
    out["lone_zero_at_end.tar"] = raw_tar((raw_header(b"a", b"0", 1), b"A"))[:1024 + 512]
    # Three user xattrs of 3000 bytes: ext4 keeps a file's xattrs in one block, so some of them
    # do not fit (ENOSPC). GNU tar warns and goes on; so do we, counting them.
    big = {"SCHILY.xattr.user.%s" % k: k * 3000 for k in "abc"}
    out["xattr_too_big.tar"] = (Tar().add("f", data=b"data", pax=big)
                                .add("g", data=b"after").bytes())
    # For a root with a mount point at "mnt" (the test mounts it).
    out["into_mount.tar"] = Tar().add("mnt/f", data=b"x").bytes()
    out["into_mount_dir.tar"] = Tar().dir("mnt", mode=0o700, uid=1234).bytes()
    out["into_mount_deep.tar"] = Tar().add("mnt/sub/f", data=b"x").bytes()
    # A later device or FIFO wins over what an earlier member put at its name (as does a
    # hardlink to one): a hardlink to the name then finds the skipped entry, never the stale
    # one.
    out["duplicates_special.tar"] = (
        Tar().add("x", data=b"stale-x").add("x", tarfile.CHRTYPE, devmajor=1, devminor=3)
        .hardlink("h1", "x")
        .add("f", data=b"stale-f").hardlink("f", "x").hardlink("h2", "f")
        .dir("d").add("d", tarfile.FIFOTYPE)
        .symlink("s", sent + "/etc/passwd").add("s", tarfile.FIFOTYPE).bytes())
    return out


def layer_tar(n):
    """An image layer as a tar inside the image: GNU long names and pax headers, many of them.

    Preloaded image tars look like this: every long name is an extension header block in the
    outer archive's file data."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i in range(n):
            ti = tarfile.TarInfo("node_modules/some-package-with-a-long-name/lib/deeply/nested/"
                                 "dir/file-%06d%s.js" % (i, "x" * 40))
            data = b"module.exports = %d;\n" % i
            ti.size, ti.mtime = len(data), T0
            t.addfile(ti, io.BytesIO(data))
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(n // 2):
            ti = tarfile.TarInfo("usr/lib/python3/dist-packages/p%05d/%s.py" % (i, "m" * 120))
            ti.pax_headers = {"SCHILY.xattr.user.k": "v%d" % i, "mtime": "%d.5" % T0}
            t.addfile(ti, io.BytesIO(b""))
    return inner.getvalue(), pax.getvalue()


def nested(out):
    """Valid archives holding uncompressed tars: they must extract byte for byte."""
    gnu, pax = layer_tar(5000)
    write(os.path.join(out, "nested_layer.gnu"), gnu)
    write(os.path.join(out, "nested_layer.pax"), pax)
    t = Tar()
    t.dir("usr/share/")
    t.add("usr/share/layer.tar", data=gnu)
    t.add("usr/share/layer-pax.tar", data=pax)
    t.add("after", data=b"after the layers")
    write(os.path.join(out, "nested_layer.tar"), t.bytes())


def many_hardlinks():
    """Enough files to make the extractor's inode set grow several times."""
    t = Tar()
    for i in range(3000):
        t.add("f%04d" % i, data=b"%d" % i)
    for i in range(0, 3000, 7):
        t.hardlink("h%04d" % i, "f%04d" % i)
    return t.bytes()


def sparse(out):
    """GNU tar writes the sparse maps (tarfile cannot): old GNU and pax 0.0, 0.1, 1.0."""
    tar = shutil.which("tar")
    if not tar:
        sys.exit("make_corpus: GNU tar is needed for the sparse archives")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sparse")
        with open(path, "wb") as f:
            f.truncate(4 << 20)
            f.seek(1 << 20)
            f.write(b"D" * 4096)
            f.seek(3 << 20)
            f.write(b"E" * 4096)
        os.utime(path, (T0, T0))
        for fmt, extra in (("gnu", []), ("pax", ["--sparse-version=1.0"])):
            dest = os.path.join(out, "sparse_%s.tar" % fmt)
            subprocess.run([tar, "--sparse", "--format=" + fmt, *extra, "--numeric-owner",
                            "-C", d, "-cf", dest, "sparse"], check=True)
        # 150 data segments: more than the limit the test sets (100), fewer than the default.
        os.unlink(path)
        with open(path, "wb") as f:
            f.truncate(150 << 16)
            for i in range(150):
                f.seek((i << 16) + 8192)
                f.write(b"%c" % (65 + i % 26) * 4096)
        os.utime(path, (T0, T0))
        for tag, fmt, extra in (("gnu", "gnu", []), ("pax00", "pax", ["--sparse-version=0.0"]),
                                ("pax01", "pax", ["--sparse-version=0.1"]),
                                ("pax10", "pax", ["--sparse-version=1.0"])):
            dest = os.path.join(out, "sparse150_%s.tar" % tag)
            subprocess.run([tar, "--sparse", "--format=" + fmt, *extra, "--numeric-owner",
                            "-C", d, "-cf", dest, "sparse"], check=True)


def compress(out, name, data):
    base = os.path.join(out, name)
    write(base + ".gz", gzip.compress(data, mtime=0))
    write(base + ".xz", lzma.compress(data))
    write(base + ".bz2", bz2.compress(data))
    zstd = shutil.which("zstd")
    if not zstd:
        sys.exit("make_corpus: the zstd CLI is needed")
    subprocess.run([zstd, "-q", "-f", "-19", "-o", base + ".zst"], input=data, check=True)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--sentinel", default="/nonexistent/fim-sentinel")
    ap.add_argument("--canary", default="fim-extract-canary")
    args = ap.parse_args()
    sent = os.path.abspath(args.sentinel)
    os.makedirs(args.outdir, exist_ok=True)

    files = hostile(sent, args.canary)
    files.update(valid(sent))
    for name, data in files.items():
        write(os.path.join(args.outdir, name), data)
    sparse(args.outdir)
    nested(args.outdir)
    compress(args.outdir, "basic.tar", files["basic.tar"])
    compress(args.outdir, "symlink_escape_abs.tar", files["symlink_escape_abs.tar"])


if __name__ == "__main__":
    main()
