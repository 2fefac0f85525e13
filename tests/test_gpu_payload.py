"""tools/gpu_payload.sh's hide/restore: it empties a repository's git index for the GPU calls and must put
it back exactly, leaving the work tree alone (run on a scratch repository, never on this one)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def payload(repo: Path, verb: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "tools" / "gpu_payload.sh"), verb], cwd=repo, capture_output=True, text=True, timeout=60)


def test_hide_sends_nothing_and_restore_puts_the_index_back(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "gpu_payload.sh", repo / "tools" / "gpu_payload.sh")
    (repo / "a.txt").write_text("tracked\n")
    git(repo, "init", "-q")
    git(repo, "add", "a.txt", "tools/gpu_payload.sh")
    git(repo, "commit", "-qm", "start")
    (repo / "a.txt").write_text("changed, not staged\n")
    (repo / "new.txt").write_text("untracked\n")
    exclude = repo / ".git" / "info" / "exclude"
    exclude.write_text("/.gpu*/\n")
    before = (git(repo, "ls-files"), git(repo, "status", "--short"), exclude.read_text())

    hidden = payload(repo, "hide")
    assert hidden.returncode == 0, hidden.stderr
    assert git(repo, "ls-files") == "" and git(repo, "ls-files", "-o", "--exclude-standard") == ""  # nothing would travel
    assert (repo / "a.txt").read_text() == "changed, not staged\n" and (repo / "new.txt").exists()
    again = payload(repo, "hide")
    assert again.returncode == 2 and "already hidden" in again.stderr  # a second hide must not save the empty index

    restored = payload(repo, "restore")
    assert restored.returncode == 0, restored.stderr
    assert (git(repo, "ls-files"), git(repo, "status", "--short"), exclude.read_text()) == before
    assert payload(repo, "restore").returncode == 2  # nothing left to restore


def test_no_verb_prints_the_usage_and_fails():
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_payload.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pack" in r.stdout and "unpack" in r.stdout
