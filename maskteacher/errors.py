"""The one exception type for bad user input.

Raise :class:`UserError` with a single line that names what is wrong (file, key, value) and
what was expected. The CLI prints it as one line and exits with code 2; nothing else in the
package catches it. ``maskteacher.cache_format`` has its own ``CacheError`` (it imports nothing
from the package) which the CLI treats the same way.
"""


class UserError(Exception):
    """Bad input from the user: a file, a config key or value, a checkpoint, a dataset."""


def user_message(exc: BaseException) -> str:
    """The one line to show for a user error, also when it was raised in a DataLoader worker:
    torch re-raises those as ``Caught <Type> in DataLoader worker process N.`` followed by the
    worker's whole traceback, whose last line is ``<module>.<Type>: <the message>``."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        _, sep, message = last.partition(": ")
        return message if sep else last
    return text
