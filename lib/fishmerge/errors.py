"""The one exception type users see: a readable message naming the problem and the fix."""


class FishmergeError(Exception):
    """Bad input or state that the user can fix; the CLI prints it without a traceback."""
