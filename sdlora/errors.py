"""One error type for bad user input: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input the user can fix; the message names the file/flag and what to do."""
