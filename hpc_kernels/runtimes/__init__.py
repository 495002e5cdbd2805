"""One adapter per external container program."""
