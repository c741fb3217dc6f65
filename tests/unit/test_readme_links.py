"""The repository's documents point only at what a clone has: a link outside the repository
(`../shared/SPEC.md`) or to a heading that is not there is broken for every reader of a clone.
The contract itself is in the repository (app/CONTRACT.md, with the OpenAPI document) and names
every endpoint; every `orch` command the README shows is one `orch` parses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a clone has")
    return set(out.stdout.splitlines())


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in HEADING.findall(markdown)}


def broken_links(doc: str, files: set[str], text: str | None = None) -> list[str]:
    text = (ROOT / doc).read_text() if text is None else text
    dirs = {str(Path(f).parent) for f in files} | {
        str(p) for f in files for p in Path(f).parents}
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (ROOT / doc).parent / path if path else ROOT / doc
        relative = Path(resolved.resolve()).relative_to(ROOT.resolve()) \
            if resolved.resolve().is_relative_to(ROOT.resolve()) else None
        if relative is None or (str(relative) not in files and str(relative) not in dirs):
            broken.append(f"{doc}: {target} (not in the repository)")
        elif anchor and str(relative).endswith(".md") and \
                anchor not in anchors(text if relative == Path(doc) else (ROOT / relative).read_text()):
            broken.append(f"{doc}: {target} (no such heading)")
    return broken


def test_every_link_in_the_documents_is_to_a_file_a_clone_has() -> None:
    files = tracked()
    docs = sorted(f for f in files if f.endswith(".md"))
    assert "README.md" in docs and "app/CONTRACT.md" in docs
    assert [b for doc in docs for b in broken_links(doc, files)] == []


def test_the_check_catches_what_a_clone_lacks() -> None:
    # A link outside the repository, a heading that is not there, an untracked file: each must
    # count as broken, or the test above proves nothing.
    files = tracked()
    text = (ROOT / "README.md").read_text() + (
        "\n[SPEC](../shared/SPEC.md) [bad](#no-such-heading) [ok](#security)\n")
    assert broken_links("README.md", files, text) == [
        "README.md: ../shared/SPEC.md (not in the repository)",
        "README.md: #no-such-heading (no such heading)"]
    assert broken_links("README.md", files - {"app/CONTRACT.md"}) == [
        "README.md: app/CONTRACT.md (not in the repository)",
        "README.md: app/CONTRACT.md#the-engine-contract (not in the repository)"]
    assert "README.md: app/CONTRACT.md#no-such-heading (no such heading)" in broken_links(
        "README.md", files, text.replace("](app/CONTRACT.md#the-engine-contract)",
                                         "](app/CONTRACT.md#no-such-heading)"))


def test_readme_links_the_contract_and_the_contract_names_every_endpoint() -> None:
    from app.api.spec import ENDPOINTS

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 400  # a guide someone reads, not a diary
    assert not re.search(r"issue [0-9]", readme + (ROOT / "app" / "DESIGN.md").read_text(), re.I)
    assert "](app/CONTRACT.md)" in readme and "shared/SPEC.md" not in readme
    contract = (ROOT / "app" / "CONTRACT.md").read_text()
    # each call by its path's last literal part (`/rollouts/{id}/pause`, `/resume`, `/abort`)
    missing = [f"{e.method} {e.path}" for e in ENDPOINTS
               if "/" + re.sub(r"/?\{[^}]+\}", "", e.path).split("/")[-1] not in contract]
    assert missing == []
    for field in ("id", "at", "engine", "event", "from", "to", "reason", "request_id"):
        assert f"`{field}`" in contract.split("An **event** is")[1].split(".")[0], field


# ---- the commands the README shows are commands `orch` has --------------------------------

# A synopsis placeholder's value, by the word before it (the option it belongs to), else by its
# own name, else a name.
VALUES = {"--host": "127.0.0.1", "--port": "8080", "--max-engines": "1", "--rate-limit-rpm": "1",
          "--warm-pool": "0", "--product": "demo", "--user": "u", "--status": "running", "--limit": "1",
          "--version": "1", "--batch-size": "2", "--max-failures": "0", "ID": "1"}


def readme_commands() -> list[list[str]]:
    """Every `orch` command line of README.md: the synopsis (placeholders filled in, `[...]`
    taken, `a | b` alternatives split) and every literal `.venv/bin/orch ...` of the examples
    (up to a redirection, a pipe or a comment)."""
    text = (ROOT / "README.md").read_text()
    synopsis = text.split("## Command line", 1)[1].split("```", 2)[1]
    commands = []
    for line in synopsis.splitlines():
        line = line.split("#", 1)[0].replace("[", " ").replace("]", " ").strip()
        if not line.startswith("orch "):
            continue
        head, *alternatives = [part.split() for part in line.split(" | ")]
        for words in [head] + [head[:2] + alt for alt in alternatives]:
            filled = [VALUES.get(words[i - 1], VALUES.get(w, "demo")) if w.isupper() else w
                      for i, w in enumerate(words)]
            commands.append(filled[1:])
    for line in re.findall(r"^\.venv/bin/orch .*$", text, re.M):
        for command in re.split(r"[#>|]", line, maxsplit=1)[0].split(";"):
            commands.append(command.split()[1:])
    return commands


def test_every_orch_command_the_readme_shows_parses() -> None:
    from app.cli import _parser

    commands = readme_commands()
    assert ["serve", "--host", "127.0.0.1", "--port", "8080"] in commands   # filled in
    assert ["products", "delete", "demo"] in commands and len(commands) >= 15
    assert ["rollout", "status", "1", "--follow"] in commands   # a literal example line
    assert ["engines", "destroy", "demo", "demo"] in commands and ["down"] in commands
    refused = []
    for command in commands:
        try:
            args = _parser().parse_args(command)
        except SystemExit:
            refused.append(" ".join(command))
            continue
        if not getattr(args, "func", None):
            refused.append(" ".join(command))
    assert refused == []
