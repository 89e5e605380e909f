"""core.uploads on real zip archives, including hostile ones: nothing may land outside, nothing half-done may stay."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from core.uploads import UploadError, extract_zip, folder_name

CENTRAL = b"PK\x01\x02"
LOCAL = b"PK\x03\x04"


def make_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def set_declared_size(data: bytes, size: int) -> bytes:
    """The same zip with every entry's uncompressed size (local and central headers) replaced by `size`."""
    out = bytearray(data)
    for signature, offset in ((LOCAL, 22), (CENTRAL, 24)):
        at = out.find(signature)
        while at != -1:
            out[at + offset : at + offset + 4] = struct.pack("<I", size)
            at = out.find(signature, at + 4)
    return bytes(out)


def everything_under(folder: Path) -> list[str]:
    """All entries below `folder`, hidden ones included (a leftover staging folder is hidden)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "workspace" / "datasets"
    folder.mkdir(parents=True)
    return folder


def test_normal_zip_extracts_from_a_path_and_from_a_file_object(tmp_path: Path, dest: Path):
    data = make_zip({"cats/a.png": b"cat a", "dogs/b.png": b"dog b", "dogs/sub/c.png": b"dog c"})
    path = tmp_path / "pets.zip"
    path.write_bytes(data)

    first = extract_zip(path, dest, "pets")
    assert first == dest / "pets"
    assert everything_under(first) == ["cats", "cats/a.png", "dogs", "dogs/b.png", "dogs/sub", "dogs/sub/c.png"]
    assert (first / "dogs" / "sub" / "c.png").read_bytes() == b"dog c"

    second = extract_zip(io.BytesIO(data), dest, "pets")  # same name again: a new folder, the first untouched
    assert second == dest / "pets-2"
    assert everything_under(second) == everything_under(first)
    assert sorted(p.name for p in dest.iterdir()) == ["pets", "pets-2"]  # no staging folder left


def test_single_top_folder_is_unwrapped_and_junk_is_skipped(dest: Path):
    data = make_zip(
        {
            "bears/grizzly/1.jpg": b"g",
            "bears/teddy/2.jpg": b"t",
            "bears/.DS_Store": b"junk",
            "__MACOSX/bears/._1.jpg": b"fork",
        }
    )
    out = extract_zip(io.BytesIO(data), dest, "upload")
    assert out == dest / "upload"
    assert everything_under(out) == ["grizzly", "grizzly/1.jpg", "teddy", "teddy/2.jpg"]


def test_unsafe_names_become_a_plain_folder_name():
    assert folder_name("../../etc") == "etc"
    assert folder_name("my bears (2)") == "my_bears_2"
    assert folder_name("...") == "dataset"


@pytest.mark.parametrize("evil", ["../evil.txt", "good/../../evil.txt", "/abs.txt", "C:/win.txt", "..\\evil.txt"])
def test_zip_slip_is_refused_with_nothing_written(tmp_path: Path, dest: Path, evil: str):
    data = make_zip({"ok/a.png": b"fine", evil: b"pwned"})
    with pytest.raises(UploadError, match="outside its folder|absolute path"):
        extract_zip(io.BytesIO(data), dest, "slip")
    assert everything_under(dest) == []
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("abs.txt"))
    assert not Path("/abs.txt").exists()


def test_symlink_entry_is_refused(tmp_path: Path, dest: Path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("data/a.png", b"fine")
        link = zipfile.ZipInfo("data/passwd.png")
        link.create_system = 3  # Unix: external_attr holds the mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UploadError, match="symbolic link"):
        extract_zip(io.BytesIO(buffer.getvalue()), dest, "links")
    assert everything_under(dest) == []


def test_too_many_files_is_refused_before_extraction(dest: Path):
    # Every entry's CRC is wrong: had extraction begun, the error would be about a damaged zip instead.
    data = make_zip({f"c/{i}.png": b"x" * 10 for i in range(5)}, zipfile.ZIP_STORED)
    broken = bytearray(data)
    at = broken.find(CENTRAL)
    while at != -1:
        broken[at + 16 : at + 20] = b"\0\0\0\0"  # CRC-32 in the central directory
        at = broken.find(CENTRAL, at + 4)
    with pytest.raises(UploadError, match="holds 5 files, more than the 3 allowed"):
        extract_zip(io.BytesIO(bytes(broken)), dest, "many", max_files=3)
    assert everything_under(dest) == []


def test_too_large_declared_size_is_refused_before_extraction(dest: Path):
    data = set_declared_size(make_zip({"c/big.png": b"small really"}), 3 * 2**30)
    with pytest.raises(UploadError, match="would unpack to 3,072 MB, more than the 1 MB allowed"):
        extract_zip(io.BytesIO(data), dest, "big", max_total_bytes=2**20)
    assert everything_under(dest) == []


def test_a_zip_that_lies_about_its_size_is_stopped_while_streaming(dest: Path):
    # 4 MB of zeros deflate to a few KB; the headers claim 100 bytes, well under every cap.
    data = set_declared_size(make_zip({"c/bomb.png": bytes(4 * 2**20)}), 100)
    with pytest.raises(UploadError) as caught:
        extract_zip(io.BytesIO(data), dest, "liar", max_total_bytes=2**20)
    # CPython's reader stops at the declared size and then fails the CRC; our own byte count is the
    # second guard. Either way the message is for the user, and not a byte stays on disk.
    assert "damaged" in str(caught.value) or "more bytes than the zip declares" in str(caught.value)
    assert everything_under(dest) == []


def test_non_zip_content_is_refused_whatever_the_name(tmp_path: Path, dest: Path):
    fake = tmp_path / "photos.zip"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n not a zip at all")
    with pytest.raises(UploadError, match="not a zip archive"):
        extract_zip(fake, dest, "photos")
    with pytest.raises(UploadError, match="not a zip archive"):
        extract_zip(io.BytesIO(b"hello"), dest, "hello")
    assert everything_under(dest) == []


def test_failed_extraction_leaves_no_partial_folder(dest: Path):
    # Three good entries, then one whose CRC is wrong: found only after the first files were written.
    data = bytearray(make_zip({"a/1.png": b"one", "a/2.png": b"two", "b/3.png": b"three", "b/4.png": b"four"}))
    last = data.rfind(CENTRAL)
    data[last + 16 : last + 20] = b"\0\0\0\0"
    with pytest.raises(UploadError, match="damaged"):
        extract_zip(io.BytesIO(bytes(data)), dest, "partial")
    assert everything_under(dest) == []


def test_duplicate_and_encrypted_entries_are_refused(dest: Path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("a/1.png", b"one")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("a/1.png", b"other")
    with pytest.raises(UploadError, match="twice"):
        extract_zip(io.BytesIO(buffer.getvalue()), dest, "dup")

    encrypted = bytearray(make_zip({"a/1.png": b"one"}))
    for signature, offset in ((LOCAL, 6), (CENTRAL, 8)):  # general purpose flag bit 0: encrypted
        at = encrypted.find(signature)
        encrypted[at + offset] |= 0x1
    with pytest.raises(UploadError, match="password"):
        extract_zip(io.BytesIO(bytes(encrypted)), dest, "secret")
    assert everything_under(dest) == []


def test_empty_zip_is_refused(dest: Path):
    with pytest.raises(UploadError, match="no files"):
        extract_zip(io.BytesIO(make_zip({"__MACOSX/._x": b"", ".hidden": b"x"})), dest, "empty")
    assert everything_under(dest) == []
