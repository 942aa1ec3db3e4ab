"""Sphinx configuration of the API reference (make docs)."""

project = "fastclip"
author = "fastclip contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Names in annotations that Sphinx cannot resolve to a page of its own stay plain text.
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
