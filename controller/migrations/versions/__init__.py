"""One module per schema revision, in order of their ``down_revision`` chain."""
