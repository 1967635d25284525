"""Zip archives: .npz, image folders and .pt2 are all zips, and all pass the same gate: the central directory
parsed here (never trusted to zipfile alone), every member bounded in size, count and compression ratio."""

import re
import stat
import struct
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

from services.errors import InputError, TooLarge
from services.uploads.rules import CHUNK, Limits, MiB, odd_character, size_text

_MAX_DIRECTORY = 64 * MiB  # a zip's central directory, which zipfile reads whole
_RATIO_FLOOR = MiB  # members smaller than this inflate to nothing worth refusing, whatever their ratio

class Budget:
    """The bytes actually inflated from one upload; declared sizes can lie, so reading stops at the cap."""

    def __init__(self, what: str, limits: Limits):
        self.what, self.cap, self.spent = what, limits.unzipped_bytes, 0

    def spend(self, n: int) -> None:
        """Count `n` more inflated bytes, refusing the upload past the cap."""
        self.spent += n
        if self.spent > self.cap:
            raise _inflates_beyond(self.what, self.cap)


def _inflates_beyond(what: str, cap: int) -> InputError:
    return TooLarge(f"{what} decompresses to more than {size_text(cap)}; upload less data or split it into several jobs")


class Member:
    """A zip member open for reading, each byte read counted against the upload's budget."""

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget):
        self._f, self._budget = zf.open(info), budget
        self.size, self.pos = info.file_size, 0  # its declared inflated size, and the bytes read so far

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left for -1)."""
        if n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        data = self._f.read(n)
        self._budget.spend(len(data))
        self.pos += len(data)
        return data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget, cap: int, what: str) -> bytes:
    if info.file_size > cap:
        raise TooLarge(f"{what}: member {info.filename!r} is larger than {size_text(cap)}")
    with Member(zf, info, budget) as m:
        return m.read()


@contextmanager
def open_zip(source: Path | IO[bytes], what: str, limits: Limits, not_zip: str) -> Iterator[zipfile.ZipFile]:
    """A zip archive whose directory passed the gate: end records and member count (read here, before zipfile
    reads anything), member kinds, names, paths, declared sizes, ratios and overlaps."""
    with ExitStack() as stack:
        f = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
        # the end records and the directory's headers are read and counted here, under the caps, before zipfile
        # parses the central directory (all of it, whatever the end record's count, each member kept in memory)
        directory = _directory(f, what, limits, not_zip)
        try:
            f.seek(0)
            zf = stack.enter_context(zipfile.ZipFile(f))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InputError(f"{what} is a damaged zip archive ({e}); create it again") from e
        if zf.start_dir != directory.offset:  # zipfile found another directory than ours
            raise InputError(f"{what} is a damaged zip archive (its directory is not where its end record says); "
                             "create it again")
        _check_members(zf.infolist(), what, limits, directory.offset)
        try:
            yield zf
        except (zipfile.BadZipFile, EOFError, OSError) as e:  # a CRC or inflate error while reading a member
            raise InputError(f"{what} is a damaged zip archive ({e}); create it again") from e


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: signature, disk, directory's disk, entries here, entries,
#                                    directory size, directory offset, comment length
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of the zip64 record, its offset, disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # signature, record size, versions, disk, directory's disk, entries here,
#                                        entries, directory size, directory offset
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # one central directory header (zipfile's structCentralDir)


@dataclass(frozen=True)
class _Directory:
    """Where a zip's central directory starts, its size in bytes and its number of members (counted, not declared)."""

    offset: int
    size: int
    members: int


def _directory(f: IO[bytes], what: str, limits: Limits, not_zip: str) -> _Directory:
    """Read the end record (and the zip64 one) as zipfile will, check them, then walk the directory's headers."""
    f.seek(0, 2)
    size = f.tell()
    tail_size = min(size, _EOCD.size + 0xFFFF)  # the end record and a comment of at most 64 KiB
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    # zipfile takes a record that ends the file without a comment, else the last signature in the tail
    at = tail.rfind(b"PK\x05\x06")
    if tail[-_EOCD.size:][:4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        at = len(tail) - _EOCD.size
    if at < 0 or len(tail) - at < _EOCD.size:
        raise InputError(f"{what} {not_zip}")
    _, disk, cd_disk, here, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, at)
    end = size - tail_size + at  # where the end record starts
    if end + _EOCD.size + comment != size:
        # trailing bytes, or a comment holding another end record: readers would disagree on the archive
        raise InputError(f"{what} has bytes after its zip archive's end record (or a comment of the wrong length); "
                         "create it again")
    directory_end = end
    if end >= _EOCD64_LOCATOR.size:
        f.seek(end - _EOCD64_LOCATOR.size)
        sig, _, record_at, disks = _EOCD64_LOCATOR.unpack(f.read(_EOCD64_LOCATOR.size))
        if sig == b"PK\x06\x07":  # zip64: zipfile takes the record just before the locator
            directory_end = end - _EOCD64_LOCATOR.size - _EOCD64.size
            f.seek(max(directory_end, 0))
            record = f.read(_EOCD64.size)
            if directory_end < 0 or len(record) < _EOCD64.size or record[:4] != b"PK\x06\x06":
                raise InputError(f"{what} is a damaged zip archive (its zip64 end record is missing); create it again")
            _, _, _, _, disk64, cd_disk64, here64, entries64, cd_size64, cd_offset64 = _EOCD64.unpack(record)
            # the plain record's fields must agree with the zip64 ones, or say "see zip64" (all bits set)
            for plain, wide, full in ((here, here64, 0xFFFF), (entries, entries64, 0xFFFF),
                                      (cd_size, cd_size64, 0xFFFFFFFF), (cd_offset, cd_offset64, 0xFFFFFFFF)):
                if plain not in (wide, full):
                    raise InputError(f"{what} is a damaged zip archive (its end record and its zip64 end record "
                                     "disagree); create it again")
            disk, cd_disk = disk or disk64 or disks > 1, cd_disk or cd_disk64
            here, entries, cd_size, cd_offset = here64, entries64, cd_size64, cd_offset64
            if record_at != directory_end and cd_offset + cd_size == directory_end:
                raise InputError(f"{what} is a damaged zip archive (its zip64 locator points elsewhere); create it again")
    if disk or cd_disk or here != entries:
        raise InputError(f"{what} spans several disks (a split archive); create it as one file")
    if entries > limits.zip_members:
        raise TooLarge(f"{what} holds {entries} files; the limit is {limits.zip_members}")
    if cd_size > _MAX_DIRECTORY:
        raise TooLarge(f"{what}: the zip directory is larger than {size_text(_MAX_DIRECTORY)}; use fewer or shorter names")
    if cd_offset + cd_size < directory_end:
        # bytes before the archive shift every offset: zipfile allows for them, torch's reader may not
        raise InputError(f"{what} has data before its zip archive (self-extracting or concatenated); create it again")
    if cd_offset + cd_size > directory_end:
        raise InputError(f"{what} is a damaged zip archive (its directory would run past its end record); create it again")
    members = _count_members(f, cd_offset, cd_size, what, limits)
    if members != entries:
        raise InputError(f"{what}: the zip's end record counts {entries} files but its directory lists {members}; "
                         "create the archive again")
    return _Directory(cd_offset, cd_size, members)


def _count_members(f: IO[bytes], offset: int, size: int, what: str, limits: Limits) -> int:
    """The headers in the `size` bytes of directory at `offset`, read a chunk at a time; stops past the member cap."""
    f.seek(offset)
    buf, at, left, count = b"", 0, size, 0

    def have(n: int) -> bool:
        nonlocal buf, at, left
        if len(buf) - at < n and left:
            chunk = f.read(min(left, max(n, MiB)))
            left -= len(chunk)
            buf, at = buf[at:] + chunk, 0
            if not chunk:
                left = 0
        return len(buf) - at >= n

    while at < len(buf) or left:
        if not have(_CENTRAL.size) or buf[at:at + 4] != b"PK\x01\x02":
            raise InputError(f"{what} is a damaged zip archive (a broken directory entry after {count} files); "
                             "create it again")
        fields = _CENTRAL.unpack_from(buf, at)
        n = _CENTRAL.size + fields[12] + fields[13] + fields[14]  # name, extra field and comment lengths
        if not have(n):
            raise InputError(f"{what} is a damaged zip archive (its directory ends inside an entry); create it again")
        at += n
        count += 1
        if count > limits.zip_members:
            raise TooLarge(f"{what} holds more than {limits.zip_members} files; the limit is {limits.zip_members}")
    return count


def _check_members(infos: list[zipfile.ZipInfo], what: str, limits: Limits, directory: int) -> None:
    if len(infos) > limits.zip_members:
        raise TooLarge(f"{what} holds {len(infos)} files; the limit is {limits.zip_members}")
    seen, total = set(), 0
    for info in infos:
        name = info.filename
        if odd := odd_character(info.orig_filename):  # zipfile cuts a name at NUL; other readers do not
            raise InputError(f"{what}: member {info.orig_filename!r} has the control or invisible character {odd} in "
                             "its name; rename it and create the archive again")
        if name in seen:
            raise InputError(f"{what}: member {name!r} appears twice; create the archive again")
        seen.add(name)
        if name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name) or ".." in name.split("/"):
            raise InputError(f"{what}: member {name!r} has an unsafe path (absolute, drive letter, backslash or '..'); "
                             "zip the folder again from inside it")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"{what}: member {name!r} is a symbolic link; zip the files themselves")
        if info.flag_bits & 0x1:
            raise InputError(f"{what}: member {name!r} is encrypted; upload an archive without a password")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(f"{what}: member {name!r} uses compression method {info.compress_type}; "
                             "use deflate (the default of zip and np.savez_compressed) or none")
        total += info.file_size
        if total > limits.unzipped_bytes:
            raise _inflates_beyond(what, limits.unzipped_bytes)
        if info.file_size > _RATIO_FLOOR and info.file_size > limits.zip_ratio * info.compress_size:
            raise TooLarge(f"{what}: member {name!r} decompresses {info.file_size / max(info.compress_size, 1):.0f}× "
                             f"(to {size_text(info.file_size)}), beyond the compression ratio limit of {limits.zip_ratio}×")
    # each member's local header and data must end before the next member (and the directory) begins: members that
    # share bytes inflate the same data many times over (an overlapping zip bomb), or hide one member in another
    ends = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < ends:
            raise InputError(f"{what}: member {info.filename!r} overlaps the member before it (a zip bomb?); "
                             "create the archive again")
        raw = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape")
        ends = info.header_offset + 30 + len(raw) + info.compress_size  # 30: the local header's fixed part
    if ends > directory:
        raise InputError(f"{what}: the data of the last member runs into the zip directory; create the archive again")
