"""Write a page template that makes `dvc plots show` readable without internet.

DVC's page (dvc_plots/index.html) loads Vega, Vega-Lite and Vega-Embed from a CDN: offline it
shows no plot. This writes a template with the three libraries inlined, taken from
vl-convert-python (the Vega project's own offline converter, a dependency of mpprop), and with
--configure points the project's local DVC config (.dvc/config.local, never in git) at it, so a
plain `dvc plots show` uses it. scripts/install.sh runs it with --configure.

    .venv/bin/python scripts/dvc_plots_offline.py --configure   # then: dvc plots show
    .venv/bin/python scripts/dvc_plots_offline.py --out T.html  # then: dvc plots show --html-template T.html

The template lies in the virtual environment (share/mpprop/), next to the package it comes
from: a new environment made by scripts/install.sh writes it again.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = Path(sys.prefix) / "share" / "mpprop" / "dvc_plots.html"
# dvc_render fills these by plain text replacement (dvc_render.html.HTML.embed). The template
# keeps {plot_divs} (the plots) and {refresh_tag}, and leaves out {scripts}: that is where DVC
# would put its renderers' CDN <script> tags.
PLOTS_PLACEHOLDER = "{plot_divs}"
PLACEHOLDERS = (PLOTS_PLACEHOLDER, "{refresh_tag}", "{scripts}")


def dvc_vegalite_major() -> str:
    """The Vega-Lite major version of DVC's plot templates (their $schema, e.g. .../v5.json)."""
    from dvc_render.vega_templates import TEMPLATES

    majors = set()
    for template in TEMPLATES:
        found = re.search(r"/vega-lite/v(\d+)", template.DEFAULT_CONTENT.get("$schema", ""))
        if found:
            majors.add(found.group(1))
    if len(majors) != 1:
        raise SystemExit(f"DVC's plot templates name Vega-Lite versions {sorted(majors)}, not one")
    return majors.pop()


def vegalite_version(available: list[str], major: str) -> str:
    """The newest of vl-convert's Vega-Lite versions that reads DVC's specs (same major)."""
    same = [v for v in available if v.split(".")[0] == major]
    if not same:
        raise SystemExit(f"vl-convert bundles Vega-Lite {', '.join(available)}, none of major "
                         f"version {major} (DVC's plot templates)")
    return max(same, key=lambda v: tuple(int(p) for p in v.split(".")))


def page(bundle: str) -> str:
    """The template page: dvc_render's default page with the libraries inline."""
    for placeholder in PLACEHOLDERS:
        if placeholder in bundle:
            # DVC would replace it inside the JavaScript too
            raise SystemExit(f"the JavaScript bundle contains DVC's placeholder {placeholder}")
    # "</script" inside the code would end the <script> element early; "<\/" is the same text
    # in JavaScript strings and regular expressions
    bundle = bundle.replace("</script", "<\\/script")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        "    {refresh_tag}",
        '    <meta charset="utf-8">',
        "    <title>DVC Plot</title>",
        # vega, vega-lite, vega-embed (window.vega, window.vegaLite, window.vegaEmbed): a plain
        # script, run before the plots' own scripts call vegaEmbed; inside a function, so that
        # its top-level names do not clash with those scripts' globals (`var spec`)
        '    <script type="text/javascript">',
        "(function () {",
        bundle,
        "})();",
        "    </script>",
        "    <style>",
        "        table { border-spacing: 15px; }",
        "    </style>",
        "</head>",
        "<body>",
        f"    {PLOTS_PLACEHOLDER}",
        "</body>",
        "</html>",
        "",
    ])


def write_template(out: Path) -> str:
    """Write the template to `out`; return the Vega-Lite version inlined."""
    import vl_convert

    version = vegalite_version(list(vl_convert.get_vegalite_versions()), dvc_vegalite_major())
    text = page(vl_convert.javascript_bundle(vl_version=version))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # a `dvc plots show` meanwhile reads the old or the new file, whole
    return version


def configure(project: Path, template: Path) -> None:
    """Set plots.html_template in the project's .dvc/config.local (DVC reads a relative path
    from .dvc/, so the clone can move)."""
    dvc_dir = project / ".dvc"
    if not dvc_dir.is_dir():
        raise SystemExit(f"{project} is not a DVC project (no .dvc/)")
    value = os.path.relpath(template.resolve(), dvc_dir.resolve())
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}  # a setting, nothing to report
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", value],
                   cwd=project, env=env, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"template file to write (default {DEFAULT_OUT})")
    parser.add_argument("--configure", action="store_true",
                        help="make it the default template of the DVC project --project")
    parser.add_argument("--project", type=Path, default=Path.cwd(),
                        help="DVC project for --configure (default: the current folder)")
    args = parser.parse_args(argv)
    version = write_template(args.out)
    print(f"wrote {args.out} (Vega-Lite {version}, Vega and Vega-Embed inline)")
    if args.configure:
        configure(args.project, args.out)
        print(f"`dvc plots show` in {args.project.resolve()} now uses it")


if __name__ == "__main__":
    main()
