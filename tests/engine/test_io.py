"""Atomic artifact writes: a full disk or a failing writer leaves nothing partial at the final path."""

import subprocess
import sys
import textwrap

import pytest

from lightning_compress.engine.io import ArtifactWriteError, atomic_path, check_writable_dir, write_atomically


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_atomically(target, b"old")
    assert write_atomically(target, b"new content") == len(b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_failing_writer_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_full_disk_raises_an_error_naming_the_path_and_leaves_nothing(tmp_path):
    """A full disk simulated with RLIMIT_FSIZE (SIGXFSZ ignored, so the write fails with EFBIG)."""
    target = tmp_path / "int8.pt2"
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from lightning_compress.engine.io import ArtifactWriteError, write_atomically
        try:
            write_atomically({str(target)!r}, b"x" * 100_000)
        except ArtifactWriteError as err:
            print("ERROR", err)
            sys.exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "Cannot write `save_path`=" in result.stdout and "int8.pt2" in result.stdout
    assert "File too large" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_check_writable_dir_names_the_argument(tmp_path):
    assert check_writable_dir(tmp_path / "new" / "a.pt2") == tmp_path / "new" / "a.pt2"
    with pytest.raises(ValueError, match=r"`save_path` must be a file path \(a string\) or None, got 5"):
        check_writable_dir(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`save_path`=.* is a directory"):
        check_writable_dir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`save_path`=.*: its folder cannot be created"):
        check_writable_dir(tmp_path / "file" / "a.pt2")


def test_unwritable_folder_fails(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r"is not writable"):
        check_writable_dir(locked / "a.pt2")
    with pytest.raises(ArtifactWriteError):
        write_atomically(locked / "a.pt2", b"x")
