"""core.uploads on real zip archives, including hostile ones: nothing may land outside, nothing half-done may stay."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from core.uploads import UploadError, extract_zip, folder_name, remove_abandoned

REPO = Path(__file__).resolve().parents[1]

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


# ---------------------------------------------------------------- issue 16: bombs, huge directories, kill -9


def zeros_zip(mb: int, extra: dict[str, bytes] | None = None) -> bytes:
    """One entry of `mb` MB of zeros (deflated to a few hundred KB), plus `extra` entries stored as they are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("c/zeros.bmp", "w") as f:
            for _ in range(mb):
                f.write(bytes(2**20))
        for name, data in (extra or {}).items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


@pytest.mark.parametrize("extra_mb", [0, 5], ids=["whole-zip", "one-entry"])
def test_a_zip_bomb_is_refused_by_its_compression_ratio_before_writing(dest: Path, extra_mb: int):
    """120 MB of zeros from a few hundred KB; with 5 MB of incompressible photos beside it the whole zip
    compresses only 20 times, so the bomb entry must be caught on its own."""
    data = zeros_zip(120, {"c/photo.jpg": os.urandom(extra_mb * 2**20)} if extra_mb else None)
    with pytest.raises(UploadError, match="looks like a zip bomb"):
        extract_zip(io.BytesIO(data), dest, "bomb")
    assert everything_under(dest) == []


def test_a_zip_larger_than_the_free_space_is_refused_before_writing(dest: Path, monkeypatch):
    free_mb = shutil.disk_usage(dest).free / 2**20
    monkeypatch.setenv("LOUPE_MIN_FREE_MB", str(free_mb))  # the workspace keeps all of it for runs
    with pytest.raises(UploadError, match="Free some space first"):
        extract_zip(io.BytesIO(make_zip({"c/a.png": b"x" * 4096})), dest, "full")
    assert everything_under(dest) == []


def test_the_file_count_is_checked_before_zipfile_reads_the_directory(dest: Path):
    """Entry 120's directory record is broken: zipfile would stop there with "damaged", so refusing with the
    count shows it was taken from the raw directory first (as two million entries are, without 1 GB of objects)."""
    data = bytearray(make_zip({f"c/{i}.png": b"x" for i in range(200)}, zipfile.ZIP_STORED))
    at = -1
    for _ in range(121):
        at = data.find(CENTRAL, at + 1)
    data[at : at + 4] = b"XXXX"
    with pytest.raises(UploadError, match="holds 120 files, more than the 100 allowed"):
        extract_zip(io.BytesIO(bytes(data)), dest, "many", max_files=100)
    assert everything_under(dest) == []
    big_directory = make_zip({f"c/{'n' * 200}{i}.png": b"" for i in range(40)}, zipfile.ZIP_STORED)
    with pytest.raises(UploadError, match="list of files alone"):  # 40 entries of 250 bytes each: over 512 x 10
        extract_zip(io.BytesIO(big_directory), dest, "long", max_files=10)


def test_an_extraction_killed_half_way_is_cleaned_up_and_a_live_one_is_not(tmp_path: Path, dest: Path):
    big = tmp_path / "big.zip"
    photo = os.urandom(32 * 2**10)
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as zf:
        for i in range(3000):  # about a second of unpacking: long enough to be killed in the middle
            zf.writestr(f"c/{i}.jpg", photo)
    code = (
        "from pathlib import Path; from core.uploads import extract_zip; "
        f"extract_zip({str(big)!r}, Path({str(dest)!r}), 'big')"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not [p for p in dest.glob(".big.unpacking-*/c/*.jpg")]:
            assert child.poll() is None and time.monotonic() < deadline, "the extraction never started"
            time.sleep(0.01)
        child.kill()  # kill -9 mid-extraction
    finally:
        child.wait()
    (abandoned,) = dest.glob(".big.unpacking-*")
    live = Path(tempfile.mkdtemp(dir=dest, prefix=f".other.unpacking-{os.getpid()}-"))  # this process: alive
    old = dest / ".older.unpacking-k2j4"  # from a Loupe that did not record pids: removed once an hour old
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent = dest / ".recent.unpacking-x9z1"
    recent.mkdir()

    assert sorted(remove_abandoned(dest)) == sorted([abandoned, old])
    assert sorted(p.name for p in dest.iterdir()) == sorted([live.name, recent.name])
    live.rmdir()
    recent.rmdir()
    extract_zip(io.BytesIO(make_zip({"c/a.png": b"a"})), dest, "next")  # every extraction cleans up first, too
    assert sorted(p.name for p in dest.iterdir()) == ["next"]
