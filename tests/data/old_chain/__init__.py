"""The migration chain as it was before the library shipped its own migrations (library and
sample tables in one line of revisions, 0001 to 0006), frozen: the upgrade-path tests build
databases with it."""
