"""Writes the reference pages (pfl/reference.py) into the site at `mkdocs build` (mkdocs-gen-files runs it)."""

import mkdocs_gen_files

from pfl.reference import pages

for path, text in pages().items():
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)
