"""Exit 0 when this checkout is already installed as scripts/setup.sh would install it, 1 otherwise.

    python3 scripts/installed.py demo,test [REQUIREMENT ...]

"Installed" means: the `vljax` distribution is an editable install of this directory, its version
and console scripts are the ones pyproject.toml declares now, and every requirement of
`vljax[<extras>]` (pyproject.toml's, read now, with their own extras, recursively) is installed at a
version its specifier allows; so is each REQUIREMENT given (setup.sh's `--no-deps` packages: their
own dependencies are not looked at). setup.sh then skips pip, whose resolver takes ~15 s to find that
nothing is to be done. Anything this check cannot read (no tomllib before Python 3.11, no
`packaging`, a missing or malformed record) counts as not installed: pip runs, as it always did.
"""
from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path


def _requirements_met(requirements, extras=(), seen=None) -> bool:
    from packaging.requirements import Requirement  # noqa: PLC0415  (may be absent: caller catches)
    seen = set() if seen is None else seen
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            return False
        if not req.specifier.contains(dist.version, prereleases=True):
            return False
        key = (req.name.lower(), tuple(sorted(req.extras)))
        if req.extras and key not in seen:
            seen.add(key)
            own = [r for r in (dist.requires or []) if "extra" in r]  # the extras' own requirements
            if not _requirements_met(own, tuple(req.extras), seen):
                return False
    return True


def installed(root: Path, extras: list[str], more: list[str] = ()) -> bool:
    import tomllib  # noqa: PLC0415  (Python >= 3.11; ImportError below on 3.10)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    dist = metadata.distribution(project["name"])
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not url.get("dir_info", {}).get("editable") or url.get("url") != root.as_uri():
        return False
    if dist.version != project["version"]:
        return False
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    if scripts != project.get("scripts", {}):
        return False
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += project.get("optional-dependencies", {})[extra]
    return _requirements_met(wanted) and _requirements_met(list(more))


def main(argv: list[str]) -> int:
    extras = [e for e in (argv[1] if len(argv) > 1 else "").split(",") if e]
    try:
        return 0 if installed(Path(__file__).resolve().parents[1], extras, argv[2:]) else 1
    except Exception:  # pylint: disable=broad-except  (anything unreadable: let pip decide)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
