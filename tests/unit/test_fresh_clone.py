"""What a fresh clone needs to pass its own tests: every input in the repository, and a clear
line naming the system packages whose absence skipped tests."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import MEDIA, REPO


def test_no_test_reads_anything_outside_the_repository():
    """A clone has nothing beside it: no test may reach for a folder above the repository."""
    outside = re.compile(r"parents\[[2-9]\]|(REPO|ROOT)\.parent|[\"']shared[\"']")
    offenders = [f"{path.name}:{n}: {line.strip()}"
                 for path in sorted((REPO / "tests").rglob("*.py")) if path.name != "test_fresh_clone.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert offenders == []


def test_every_shipped_clip_is_attributed_with_its_checksum():
    """media/README.md names each clip with its sha256 (the CC BY 4.0 attribution goes with it)."""
    readme = (MEDIA / "README.md").read_text()
    assert "CC BY 4.0" in readme and (MEDIA / "LICENSE-CC-BY-4.0.txt").is_file()
    listed = dict((name, digest) for digest, name in re.findall(r"([0-9a-f]{64})\s+(\S+\.mp4)", readme))
    clips = sorted(p.name for p in MEDIA.glob("*.mp4"))
    assert sorted(listed) == clips
    for name in clips:
        assert hashlib.sha256((MEDIA / name).read_bytes()).hexdigest() == listed[name], name


@pytest.mark.slow
def test_skips_for_missing_system_packages_end_with_one_line_to_install_them(tmp_path):
    """Tests skipped for a missing Debian package are summed up in one `apt-get install` line."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("vh_conftest", {str(REPO / "tests" / "conftest.py")!r})
        vh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vh)
        pytest_terminal_summary = vh.pytest_terminal_summary
        missing_system_package = vh.missing_system_package
    """))
    (tmp_path / "test_some.py").write_text(textwrap.dedent("""
        import pytest
        from conftest import missing_system_package

        def test_needs_chromium():
            pytest.skip(missing_system_package("chromium"))

        def test_needs_rtsp():
            pytest.skip(missing_system_package("rtsp-server"))

        def test_needs_ffprobe():
            pytest.skip(missing_system_package("ffprobe"))

        def test_skipped_for_another_reason():
            pytest.skip("not on this platform")

        def test_runs():
            pass
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "skipped for missing system packages" in line]
    assert lines == ["3 tests skipped for missing system packages; to run them: sudo apt-get install -y "
                     "--no-install-recommends chromium python3-gi gir1.2-gst-rtsp-server-1.0 "
                     "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad ffmpeg"], \
        result.stdout
