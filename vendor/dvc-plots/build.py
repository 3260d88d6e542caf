"""Rebuild template.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` and `dvc plots diff` write a page that loads these three scripts from a
CDN, so offline (a CI runner, a laptop on a plane) not one chart renders ("vegaEmbed is
not defined"). .dvc/config points DVC at this template instead; it carries the scripts.
The versions are the ones DVC's renderer (dvc-render) asks the CDN for. Run from the
repository root with npm on the PATH:

    python vendor/dvc-plots/build.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- {provenance} -->
{inline_scripts}
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def _script(tgz: Path, name: str) -> tuple[str, str, str]:
    """(minified build, LICENSE text, sha256 of the tarball) of one npm package."""
    with tarfile.open(tgz) as tar:
        js = tar.extractfile(f"package/build/{name}.min.js").read().decode()
        license_text = tar.extractfile("package/LICENSE").read().decode()
    if "</script" in js.lower():
        sys.exit(f"{name}.min.js contains </script: it cannot be inlined")
    return js, license_text, hashlib.sha256(tgz.read_bytes()).hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{n}@{v}" for n, v in PACKAGES.items()]
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        scripts, licenses, provenance = [], [], []
        for name, version in PACKAGES.items():
            js, license_text, digest = _script(Path(tmp) / f"{name}-{version}.tgz", name)
            scripts.append(f"    <script>/* {name} {version} (BSD-3-Clause) */\n{js}\n    </script>")
            licenses.append(f"{name} {version}\n{'=' * 40}\n{license_text.strip()}\n")
            provenance.append(f"{name}-{version}.tgz sha256 {digest}")
    # {{ and }} stay doubled for str.format, then come out single: DVC fills its own placeholders.
    page = PAGE.format(
        refresh_tag="{refresh_tag}",
        plot_divs="{plot_divs}",
        provenance="built by vendor/dvc-plots/build.py from npm: " + "; ".join(provenance),
        inline_scripts="\n".join(scripts),
    )
    (HERE / "template.html").write_text(page)
    (HERE / "LICENSES.txt").write_text("\n".join(licenses))
    print(f"wrote {HERE / 'template.html'} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main()
