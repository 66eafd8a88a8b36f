"""Training/evaluation plumbing shared by every entrypoint."""
